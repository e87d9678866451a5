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
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from pymongo.errors import PyMongoError

from components.errors import one_line
from components.mirror.dashboard import data
from components.mirror.sync import connect_mongo, database
from components.services import ServiceError, check_mongo, mongo_uri
from components.settings import mask_text, mask_uri

VIEWS = ("Model detail", "Model comparison", "Time filter", "Live monitoring")
REFRESH_SECONDS = 2
SORTABLE = {"start_time": "Start time", "test_accuracy": "Test accuracy",
            "val_accuracy": "Val accuracy", "train_accuracy": "Train accuracy",
            "best_val_loss": "Best val loss", "test_loss": "Test loss",
            "duration_sec": "Duration", "model_name": "Model", "learning_rate": "Learning rate"}
TABLE_COLUMNS = {"model_name": "model", "version": "version", "run_name": "run",
                 "experiment": "experiment", "status": "status",
                 "train_accuracy": "train acc", "val_accuracy": "val acc",
                 "test_accuracy": "test acc", "best_val_loss": "best val loss",
                 "test_loss": "test loss", "dropout": "dropout", "batch_size": "batch size",
                 "learning_rate": "learning rate", "duration_sec": "duration (s)",
                 "start_time": "start (UTC)", "run_id": "run id"}


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


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return MISSING
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "num":
        return f"{value:.4f}"
    if kind == "bool":
        return "yes" if value else "no"
    if kind == "time":
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    if kind == "sec":
        return data.format_seconds(value).replace("-", MISSING)
    return str(value)


# --------------------------------------------------------------------------- charts


def curves_figure(curves: pd.DataFrame, labels: dict[str, str], models: dict[str, str],
                  metric: str) -> go.Figure:
    """Train (solid) vs. val (dashed) `metric` ("loss" or "acc") per epoch, one colour a model."""
    fig = go.Figure()
    for run_id, rows in curves.groupby("run_id", sort=False):
        colour = data.model_colour(models.get(run_id))
        for split, dash in (("train", "solid"), ("val", "dash")):
            column = f"{split}_{metric}"
            if column in rows and rows[column].notna().any():
                fig.add_trace(go.Scatter(
                    x=rows["epoch"], y=rows[column], mode="lines+markers",
                    name=f"{labels.get(run_id, run_id)} {split}",
                    line={"color": colour, "dash": dash}))
    last = int(curves["epoch"].max()) if not curves.empty else 1
    fig.update_xaxes(tick0=1, dtick=max(1, -(-last // 10)))  # whole epochs, about 10 ticks
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=360,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"font": {"size": 10}})
    return fig


def show_curves(curves: pd.DataFrame, labels: dict[str, str], models: dict[str, str],
                key: str) -> None:
    left, right = st.columns(2)
    left.plotly_chart(curves_figure(curves, labels, models, "loss"), key=f"{key}-loss",
                      width="stretch")
    right.plotly_chart(curves_figure(curves, labels, models, "acc"), key=f"{key}-acc",
                       width="stretch")


def show_table(frame: pd.DataFrame, key: str) -> None:
    """The run table with the sort the user picked (also sortable by clicking headers)."""
    left, right = st.columns([3, 1])
    column = left.selectbox("Sort by", list(SORTABLE), format_func=SORTABLE.get,
                            key=f"{key}-sort")
    ascending = right.toggle("Ascending", value=False, key=f"{key}-asc")
    ordered = data.sort_runs(frame, column, ascending)
    st.caption(f"{len(ordered)} runs")
    if isinstance(ordered["start_time"].dtype, pd.DatetimeTZDtype):  # shown as UTC, no zone
        ordered = ordered.assign(start_time=ordered["start_time"].dt.tz_convert(None))
    st.dataframe(ordered[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS), hide_index=True,
                 width="stretch", key=f"{key}-table")


# --------------------------------------------------------------------------- views


def detail_view(db) -> None:
    search = st.text_input("Search runs (model, version or run id)", key="detail-search")
    choices = data.run_choices(db, search)
    if not choices:
        st.info(f"No run matches “{search}”.")
        return
    labels = {d["run_id"]: data.run_label(d) for d in choices}
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="detail-run")
    doc = data.run_detail(db, run_id) if run_id else None
    if doc is None:
        st.info("That run is no longer in the mirror.")
        return
    status = doc.get("status", "-")
    st.subheader(f"{doc.get('model_name', '?')} v{doc.get('version', '?')} — {status}")
    aliases = data.registry_aliases(doc)
    if aliases:
        st.markdown("Registry: " + ", ".join(f"`{a}`" for a in aliases))
    if doc.get("mlflow_url"):
        st.markdown(f"[Open the run in the MLflow UI]({doc['mlflow_url']})")
    if doc.get("error"):
        st.error(f"Error: {doc['error']}")
    scores = st.columns(5)
    for col, (label, field, kind) in zip(scores, (
            ("Train accuracy", "train_accuracy", "pct"), ("Val accuracy", "val_accuracy", "pct"),
            ("Test accuracy", "test_accuracy", "pct"), ("Best val loss", "best_val_loss", "num"),
            ("Test loss", "test_loss", "num")), strict=True):
        col.metric(label, _fmt(doc.get(field), kind))
    rows = [("Model", doc.get("model_name"), ""), ("Version", doc.get("version"), ""),
            ("Run id", doc.get("run_id"), ""), ("Experiment", doc.get("experiment"), ""),
            ("Status", status, ""), ("Number of classes", doc.get("num_classes"), ""),
            ("Feature extraction", doc.get("feature_extraction"), "bool"),
            ("Dropout", doc.get("dropout"), ""), ("Batch size", doc.get("batch_size"), ""),
            ("Learning rate", doc.get("learning_rate"), ""),
            ("Early stopping", doc.get("early_stopping"), "bool"),
            ("Patience", doc.get("patience"), ""), ("Weights", doc.get("weights"), ""),
            ("Image size", doc.get("image_size"), ""),
            ("Epochs", f"{_fmt(doc.get('epochs_run'))} / {_fmt(doc.get('max_epochs'))}", ""),
            ("Duration", doc.get("duration_sec"), "sec"),
            ("Start time", doc.get("start_time"), "time"),
            ("End time", doc.get("end_time"), "time")]
    st.table(pd.DataFrame({"field": [r[0] for r in rows],
                           "value": [_fmt(r[1], r[2]) for r in rows]}).set_index("field"))
    findings_panel(doc)
    curves = data.load_curves(db, [run_id])
    if curves.empty:
        st.info("This run has no epochs in the mirror yet.")
        return
    show_curves(curves, {run_id: "run"}, {run_id: doc.get("model_name")}, "detail")


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


def comparison_view(db) -> None:
    frame = data.load_runs(db, **_filters(db))
    if frame.empty:
        st.info("No run matches these filters.")
        return
    show_table(frame, "cmp")
    labels = {r.run_id: f"{r.model_name or '?'} v{r.version if pd.notna(r.version) else '?'}"
                        f" · {r.run_id[:8]}" for r in frame.itertuples()}
    models = dict(zip(frame["run_id"], frame["model_name"], strict=True))
    default = list(frame.dropna(subset=["test_accuracy"]).nlargest(3, "test_accuracy")["run_id"]
                   ) or list(frame["run_id"][:3])
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
        fig = px.bar(bars, x="model_name", y="test_accuracy", color="model_name",
                     color_discrete_map=data.colour_map(bars["model_name"]),
                     hover_data=["runs"], title="Best test accuracy by model")
        fig.update_layout(showlegend=False, height=340, yaxis_tickformat=".0%")
        st.plotly_chart(fig, key="cmp-bars", width="stretch")


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
            run_curves = curves[curves["run_id"] == row.run_id]
            cols = st.columns(6)
            cols[0].metric("Elapsed", data.format_seconds(row.elapsed_sec))
            cols[1].metric("Last heartbeat", data.format_seconds(row.heartbeat_age_sec) + " ago")
            last = run_curves.iloc[-1].to_dict() if not run_curves.empty else {}
            for col, (label, field) in zip(cols[2:], (
                    ("Train loss", "train_loss"), ("Val loss", "val_loss"),
                    ("Train acc", "train_acc"), ("Val acc", "val_acc")), strict=True):
                col.metric(label, _fmt(last.get(field), "num"))
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
