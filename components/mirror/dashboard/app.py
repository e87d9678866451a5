"""The cnnflow dashboard: a Streamlit page over the Mongo mirror (`cnnflow dashboard`).

Four views picked in the sidebar: model detail, model comparison, time filter and live
monitoring. It reads MONGO_URI (else the server `cnnflow up` started; else it says so in one
line and guesses no address) and only reads: MLflow stays behind `cnnflow sync`, so the page
works wherever the mirror is reachable. Queries live in components/mirror/dashboard/data.py;
this file only lays them out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from pymongo.errors import PyMongoError

from components import humanize
from components.errors import one_line
from components.mirror.dashboard import data
from components.mirror.sync import connect_mongo, database
from components.services import ServiceError, check_mongo, mongo_uri
from components.settings import mask_text, mask_uri

VIEWS = ("Model detail", "Model comparison", "Time filter", "Live monitoring")
REFRESH_SECONDS = 2
SORTABLE = ("start_time", "test_accuracy", "val_accuracy", "train_accuracy", "best_val_loss",
            "test_loss", "duration_sec", "model_name", "learning_rate")
# The run tables' columns in order (titles and cells from components.humanize); text reads
# left, numbers right; model and version stay in view when the table scrolls sideways, and
# the registry column (which run is @champion) comes right after them, never scrolled away.
TABLE_COLUMNS = ("model_name", "version", "registry", "train_accuracy", "val_accuracy",
                 "test_accuracy", "dropout", "batch_size", "learning_rate", "duration_sec",
                 "start_time", "status", "run_id")
TEXT_COLUMNS = ("model_name", "status", "registry", "run_id", "start_time")
PINNED_COLUMNS = ("model_name", "version")
SHORT_ID = 8  # run id characters a table shows, as the report does
# Model detail: the score tiles, then the rows of the field table (absent fields left out).
DETAIL_SCORES = ("train_accuracy", "val_accuracy", "test_accuracy", "best_val_loss", "test_loss")
DETAIL_ROWS = ("model_name", "version", "step", "run_id", "experiment", "status", "num_classes",
               "feature_extraction", "dropout", "batch_size", "learning_rate", "early_stopping",
               "patience", "weights", "image_size", "duration_sec", "start_time", "end_time")
PCT_PAD = 2.0  # percentage points around the data on accuracy axes


@st.cache_resource(show_spinner=False)
def _client(uri: str):
    """One pooled client per URI for the whole server, not one per rerun."""
    return connect_mongo(uri, timeout=3.0)


def open_database(uri: str) -> tuple[Any, str | None]:
    """(db, None), or (None, one-line reason with the URI masked) when Mongo does not answer."""
    try:
        check_mongo(uri, timeout=2.0)
    except ServiceError as exc:
        return None, str(exc)
    return database(_client(uri), uri), None


def unreachable(error: str) -> None:
    """The one message for a Mongo that does not answer (URI already masked by check_mongo)."""
    st.error(error)
    st.info("Start the local servers with `cnnflow up`, then keep the mirror current with "
            "`cnnflow sync --follow` (or set MONGO_URI to your MongoDB).")


MISSING = "—"  # not "-": Streamlit's tables render a lone "-" as a Markdown bullet


def stopped_answering(uri: str, exc: BaseException) -> None:
    """Mongo went away after the check: one masked line, no traceback."""
    reason = mask_text(one_line(exc) or type(exc).__name__)[:200]
    unreachable(f"MongoDB at {mask_uri(uri)} stopped answering ({reason})")


def _fmt(value: Any, name: str = "") -> str:
    """A value for a metric tile: humanize.number by what metric `name` measures, `—` when
    missing."""
    return humanize.number(value, name) or MISSING


def fitted_range(values: Any, pad: float = PCT_PAD) -> list[float] | None:
    """An axis range around percentages, `pad` points either side and kept within 0..100, so
    90.8 % and 93.9 % look different; None (plotly's own) when there is nothing to fit."""
    series = pd.Series(values, dtype=float).dropna()
    if series.empty:
        return None
    return [max(0.0, series.min() - pad), min(100.0, series.max() + pad)]


# --------------------------------------------------------------------------- charts


def curves_figure(curves: pd.DataFrame, labels: dict[str, str], models: dict[str, str],
                  metric: str) -> go.Figure:
    """Train (solid) vs. val (dashed) `metric` ("loss" or "acc") per epoch, one colour a model;
    accuracy in percent on an axis fitted to the data, legends `lenet5 v1 — train`."""
    fig = go.Figure()
    scale = 100.0 if metric == "acc" else 1.0
    shown: list[pd.Series] = []
    for run_id, rows in curves.groupby("run_id", sort=False):
        colour = data.model_colour(models.get(run_id))
        for split, dash in (("train", "solid"), ("val", "dash")):
            column = f"{split}_{metric}"
            if column in rows and rows[column].notna().any():
                values = rows[column] * scale
                shown.append(values)
                fig.add_trace(go.Scatter(
                    x=rows["epoch"], y=values, mode="lines+markers",
                    name=f"{labels.get(run_id, run_id)} — {split}",
                    hovertemplate="epoch %{x}: " + ("%{y:.1f} %" if scale > 1 else "%{y:.4g}"),
                    line={"color": colour, "dash": dash}))
    last = int(curves["epoch"].max()) if not curves.empty else 1
    fig.update_xaxes(tick0=1, dtick=max(1, -(-last // 10)))  # whole epochs, about 10 ticks
    title = humanize.label("accuracy" if metric == "acc" else "loss")
    fig.update_layout(title=title.capitalize(), xaxis_title=humanize.label("epoch"),
                      yaxis_title=title, height=360,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"font": {"size": 11}, "orientation": "h", "x": 0, "y": -0.25,
                              "yanchor": "top"})
    if scale > 1:
        fig.update_yaxes(ticksuffix=" %",
                         range=fitted_range(pd.concat(shown) if shown else []))
    return fig


def show_curves(curves: pd.DataFrame, labels: dict[str, str], models: dict[str, str],
                key: str) -> None:
    left, right = st.columns(2)
    left.plotly_chart(curves_figure(curves, labels, models, "loss"), key=f"{key}-loss",
                      width="stretch")
    right.plotly_chart(curves_figure(curves, labels, models, "acc"), key=f"{key}-acc",
                       width="stretch")


def table_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The run table as people read it: TABLE_COLUMNS in order under humanize's titles, every
    cell humanize.number's text (`93.9 %`, `3 min 05 s`), missing values empty; run ids
    short, as in the report (the detail view's search finds a run by them)."""
    cells = {humanize.label(c): [humanize.number(v, c) for v in frame[c]]
             for c in TABLE_COLUMNS if c != "run_id"}
    cells[humanize.label("run_id")] = [str(v)[:SHORT_ID] for v in frame["run_id"]]
    return pd.DataFrame(cells, dtype=object)


def show_table(frame: pd.DataFrame, key: str) -> None:
    """The run table in the order the user picked (the picker sorts by value; clicking a
    header sorts the shown text)."""
    left, right = st.columns([3, 1])
    column = left.selectbox("Sort by", SORTABLE, format_func=humanize.label, key=f"{key}-sort")
    ascending = right.toggle("Ascending", value=False, key=f"{key}-asc")
    ordered = data.sort_runs(frame, column, ascending)
    st.caption(humanize.plural(len(ordered), "run"))
    config = {humanize.label(c): st.column_config.TextColumn(
        humanize.label(c), pinned=c in PINNED_COLUMNS,
        alignment="left" if c in TEXT_COLUMNS else "right") for c in TABLE_COLUMNS}
    st.dataframe(table_cells(ordered), hide_index=True, width="stretch", column_config=config,
                 placeholder="", key=f"{key}-table")


# --------------------------------------------------------------------------- views


def detail_view(db) -> None:
    search = st.text_input("Search runs (model, version or run id)", key="detail-search")
    choices = data.run_choices(db, search)
    if not choices:
        st.info(f"No run matches “{search}”.")
        return
    labels = {d["run_id"]: data.run_label(d) for d in choices}
    run_id = st.selectbox("Run", list(labels), index=data.default_choice(choices),
                          format_func=labels.get, key="detail-run")
    doc = data.run_detail(db, run_id) if run_id else None
    if doc is None:
        st.info("That run is no longer in the mirror.")
        return
    name = data.run_names([doc])[run_id]
    step = doc.get("step") or "?"
    st.subheader(f"{name} — {step}, {doc.get('status', '?')}")
    aliases = data.registry_aliases(doc)
    if aliases:
        st.markdown("Registry: " + ", ".join(f"`{a}`" for a in aliases))
    if doc.get("mlflow_url"):
        st.markdown(f"[Open the run in the MLflow UI]({doc['mlflow_url']})")
    if doc.get("error"):
        st.error(f"Error: {doc['error']}")
    scores = [(f, humanize.number(doc.get(f), f)) for f in DETAIL_SCORES]
    scores = [(f, text) for f, text in scores if text]  # a score the run has not got: no tile
    for col, (field, text) in zip(st.columns(max(len(scores), 1)), scores, strict=False):
        col.metric(humanize.label(field).capitalize(), text)
    rows = {humanize.label(f).capitalize(): humanize.number(doc.get(f), f)
            for f in DETAIL_ROWS}
    if doc.get("epochs_run") is not None or doc.get("max_epochs") is not None:
        rows["Epochs"] = (f"{humanize.number(doc.get('epochs_run'), 'epochs_run') or '?'} / "
                          f"{humanize.number(doc.get('max_epochs'), 'max_epochs') or '?'}")
    rows = {field: text for field, text in rows.items() if text}  # absent fields: no row
    fields, findings = st.columns(2)  # the facts beside what evaluate found
    fields.table(pd.DataFrame({"value": list(rows.values())},
                              index=pd.Index(list(rows), name="field")))
    with findings:
        findings_panel(doc)
    curves = data.load_curves(db, [run_id])
    if curves.empty:
        if step == data.TRAIN_STEP:
            st.info("This run has no epochs in the mirror yet.")
        else:
            st.caption(f"This {step} run has no training epochs of its own.")
        return
    show_curves(curves, {run_id: name}, {run_id: doc.get("model_name")}, "detail")


def findings_panel(doc: dict[str, Any]) -> None:
    """What evaluate's Grad-CAM and label-issues found, when the run has them: the image is
    the MLflow server's artifact link stored in the mirror, loaded by the browser."""
    if doc.get("label_issues") is not None:
        count = doc["label_issues"]
        text = f"**Label issues:** {count} likely mislabelled image{'s' * (count != 1)}"
        if doc.get("label_issues_url"):
            text += f" ([review the list]({doc['label_issues_url']}))"
        st.markdown(text)
    if doc.get("explain_overview_url"):
        st.markdown("**Where the model looks** (Grad-CAM on the test split's hardest images)")
        st.image(doc["explain_overview_url"], width="stretch")


def _filters(db) -> dict[str, Any]:
    options = data.filter_options(db)
    cols = st.columns(4)
    tag_text = st.text_input("Tag (key=value, or key)", key="cmp-tag",
                             placeholder="cnnflow.weights_source=random-fallback")
    return {"models": cols[0].multiselect("Model", options["models"], key="cmp-models"),
            "statuses": cols[1].multiselect("Status", options["statuses"], key="cmp-status"),
            "experiments": cols[2].multiselect("Experiment", options["experiments"],
                                               key="cmp-exp"),
            "digests": cols[3].multiselect("Dataset digest", options["digests"],
                                           key="cmp-digest"),
            "tag": data.parse_tag_filter(tag_text)}


def registry_panel(db, experiments: list[str]) -> None:
    """Which run is `@champion` (and `@challenger`) of each registered model, one line each."""
    lines = []
    for alias in (data.CHAMPION, data.CHALLENGER):
        for doc in data.aliased(db, alias, experiments):
            name = data.run_names([doc])[doc["run_id"]]
            score = humanize.number(doc.get("test_accuracy"), "test_accuracy")
            score = f" — {humanize.label('test_accuracy')} {score}" if score else ""
            lines.append(f"**{alias.capitalize()}:** {name}{score} "
                         f"(`{doc['registered']} @{alias}`)")
    if lines:
        st.markdown("  \n".join(lines))
    else:
        st.caption("No registry version holds `@champion` yet: `cnnflow evaluate` registers "
                   "a challenger, `cnnflow promote` makes it champion.")


def bars_figure(bars: pd.DataFrame) -> go.Figure:
    """Best test accuracy per model, in percent, on an axis fitted to the bars (so 90.8 % and
    93.9 % differ), each bar labelled with its value."""
    pct = bars["test_accuracy"] * 100
    fig = go.Figure(go.Bar(
        x=bars["model_name"], y=pct,
        text=[humanize.number(v, "test_accuracy") for v in bars["test_accuracy"]],
        textposition="outside", cliponaxis=False,
        customdata=[humanize.plural(n, "run") for n in bars["runs"]],
        hovertemplate="%{x}: %{text} (best of %{customdata})<extra></extra>",
        marker_color=[data.model_colour(m) for m in bars["model_name"]]))
    best = f"best {humanize.label('test_accuracy')}"
    fig.update_layout(title=f"{best.capitalize()} by model", showlegend=False, height=340,
                      xaxis_title=humanize.label("model_name"), yaxis_title=best,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_yaxes(ticksuffix=" %", range=fitted_range(pct))
    return fig


def comparison_view(db) -> None:
    top = st.container()  # the champion goes above the filters, for the experiments picked
    filters = _filters(db)
    with top:
        registry_panel(db, filters["experiments"])
    frame = data.load_runs(db, **filters)
    if frame.empty:
        st.info("No run matches these filters.")
        return
    show_table(frame, "cmp")
    labels = data.run_names(frame.to_dict("records"))
    models = dict(zip(frame["run_id"], frame["model_name"], strict=True))
    trained = frame[frame["step"] == data.TRAIN_STEP]  # an ensemble has no curves to overlay
    default = list(trained.dropna(subset=["test_accuracy"]).nlargest(3, "test_accuracy")[
        "run_id"]) or list(trained["run_id"][:3])
    chosen = st.multiselect("Overlay the curves of", list(labels), default=default,
                            format_func=labels.get, key="cmp-chosen")
    if chosen:
        curves = data.load_curves(db, chosen)
        if curves.empty:
            st.info("The chosen runs have no epochs in the mirror yet.")
        else:
            show_curves(curves, labels, models, "cmp")
    bars = data.best_test_accuracy_by_model(frame)
    if bars.empty:
        st.info("No run in this table has a test accuracy yet (run `cnnflow evaluate`).")
    else:
        st.plotly_chart(bars_figure(bars), key="cmp-bars", width="stretch")


def time_view(db) -> None:
    today = datetime.now(UTC).date()
    picked = st.date_input("Runs started between", value=(today - timedelta(days=30), today),
                           key="time-range")
    if not isinstance(picked, tuple | list) or len(picked) != 2:
        st.info("Pick an end date too.")
        return
    start, end = data.day_range(*picked)
    frame = data.load_runs(db, start=start, end=end)
    if frame.empty:
        st.info(f"No run started between {picked[0]} and {picked[1]}.")
        return
    show_table(frame, "time")


@st.fragment(run_every=REFRESH_SECONDS)
def live_panel(uri: str) -> None:
    """Re-runs alone every 2 s, so the rest of the page and its widgets keep their state."""
    db, error = open_database(uri)
    if error:
        unreachable(error)
        return
    try:
        live = data.live_runs(db)
        curves = data.load_curves(db, list(live["run_id"]))
    except PyMongoError as exc:
        stopped_answering(uri, exc)
        return
    st.caption(f"Refreshed {datetime.now(UTC):%H:%M:%S} UTC, every {REFRESH_SECONDS} s")
    if live.empty:
        st.info("No run is in progress. Start one with `cnnflow train` "
                "(and keep `cnnflow sync --follow` running).")
        return
    for row in live.itertuples():
        name = f"{row.model_name or '?'} · {row.run_name or row.run_id}"
        with st.container(border=True):
            if row.status == "died":
                st.warning(f"{name}: died — no sign of life for "
                           f"{data.format_seconds(row.heartbeat_age_sec)}", icon="⚠️")
            else:
                st.markdown(f"**{name}** — in progress")
            current = int(row.current_epoch) if pd.notna(row.current_epoch) else 0
            total = int(row.max_epochs) if pd.notna(row.max_epochs) else None
            st.progress(row.progress if pd.notna(row.progress) else 0.0,
                        text=f"epoch {current} / {total or '?'}")
            if isinstance(row.epoch_text, str):  # the heartbeat: where it is inside the epoch
                fraction = row.epoch_fraction
                st.progress(float(fraction) if pd.notna(fraction) else 0.0, text=row.epoch_text)
            run_curves = curves[curves["run_id"] == row.run_id]
            cols = st.columns(6)
            cols[0].metric("Elapsed", data.format_seconds(row.elapsed_sec))
            cols[1].metric("Last heartbeat", humanize.ago(row.heartbeat_age_sec)
                           if pd.notna(row.heartbeat_age_sec) else MISSING)
            last = run_curves.iloc[-1].to_dict() if not run_curves.empty else {}
            for col, (label, field) in zip(cols[2:], (
                    ("Train loss", "train_loss"), ("Val loss", "val_loss"),
                    ("Train acc", "train_acc"), ("Val acc", "val_acc")), strict=True):
                col.metric(label, _fmt(last.get(field), field))
            if run_curves.empty:
                st.info("No epoch finished yet.")
            else:
                show_curves(run_curves, {row.run_id: row.model_name or "run"},
                            {row.run_id: row.model_name}, f"live-{row.run_id}")


# --------------------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="cnnflow dashboard", layout="wide")
    view = st.sidebar.radio("View", VIEWS, key="view")
    st.sidebar.caption("Reads the Mongo mirror only; `cnnflow sync --follow` keeps it current.")
    st.title(view)
    try:  # asked on every rerun: a `cnnflow up` after the page opened is picked up
        uri = mongo_uri()
    except ServiceError as exc:  # neither MONGO_URI nor a server `up` started: never a guess
        unreachable(str(exc))
        return
    if view == "Live monitoring":
        live_panel(uri)
        return
    db, error = open_database(uri)
    if error:
        unreachable(error)
        return
    if not data.has_runs(db):
        st.info("No runs in the mirror yet: train one with `cnnflow train`, then run "
                "`cnnflow sync` (or `cnnflow up --with-sync`).")
        return
    try:
        {"Model detail": detail_view, "Model comparison": comparison_view,
         "Time filter": time_view}[view](db)
    except PyMongoError as exc:
        stopped_answering(uri, exc)


main()
