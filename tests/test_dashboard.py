"""The Streamlit dashboard (`cnnflow dashboard`): its data layer and each view, run in-process
with Streamlit's AppTest against a real secantusd-py seeded in the mirror's schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from helpers import SCREENSHOTS, free_port, launch_chromium, playwright_or_skip
from pymongo import MongoClient

from components.mirror.dashboard import data
from components.mirror.sync import EPOCHS, STATUS, TRAININGS, ensure_indexes, safe_key

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "components" / "mirror" / "dashboard" / "app.py")
NOW = datetime.now(UTC).replace(microsecond=0)
DIGEST = safe_key("cnnflow.dataset_digest")
SOURCE = safe_key("cnnflow.weights_source")
URL = "http://127.0.0.1:5000/#/experiments/1/runs/"
EXPLAIN = "http://127.0.0.1:5000/get-artifact?path=evaluation%2Ftest%2Fexplain%2Foverview.png"


def _run(run_id: str, model: str, version: int, status: str, start: datetime, *,
         epochs: int, **fields) -> dict:
    """A `trainings` document as the mirror writes it (absent fields stay absent)."""
    doc = {"_id": run_id, "run_id": run_id, "run_name": f"{model}-v{version}",
           "experiment": fields.pop("experiment", "digits"), "experiment_id": "1",
           "step": "train", "model_name": model, "version": version, "status": status,
           "start_time": start, "max_epochs": 10, "epochs_run": epochs,
           "mlflow_url": URL + run_id,
           "tags": {DIGEST: fields.pop("digest", "d1"), **fields.pop("tags", {})},
           "params": {"lr": "0.001"}, "metrics": {}}
    if status not in ("in_progress", "died"):
        doc["end_time"] = start + timedelta(seconds=fields.get("duration_sec", 60))
    doc.update(fields)
    return doc


RUNS = [
    _run("r1resnet", "resnet18", 1, "completed", NOW - timedelta(days=2), epochs=5,
         train_accuracy=0.97, val_accuracy=0.93, test_accuracy=0.91, best_val_loss=0.21,
         test_loss=0.25, dropout=0.3, batch_size=32, learning_rate=0.001, num_classes=10,
         feature_extraction=True, early_stopping=True, patience=3, weights="imagenet",
         image_size=64, duration_sec=125.0, label_issues=3, label_issues_url=URL + "li1",
         explain_overview_url=EXPLAIN,
         registry={"versions": [{"name": "digits-clf", "version": 4, "aliases": ["champion"]}]}),
    _run("r2lenet", "lenet5", 1, "completed", NOW - timedelta(days=1), epochs=3,
         train_accuracy=0.85, val_accuracy=0.82, test_accuracy=0.80, best_val_loss=0.5,
         test_loss=0.55, dropout=0.5, batch_size=16, learning_rate=0.01, duration_sec=40.0,
         digest="d2", tags={SOURCE: "random-fallback"},
         registry={"versions": [{"name": "digits-clf", "version": 5,
                                 "aliases": ["challenger"]}]}),
    _run("r3custom", "custom_cnn", 2, "failed", NOW - timedelta(days=3), epochs=2,
         error="RuntimeError: out of memory", dropout=0.2, batch_size=64, learning_rate=0.1),
    _run("r4custom", "custom_cnn", 3, "killed", NOW - timedelta(days=5), epochs=0,
         dropout=0.2, batch_size=8, learning_rate=0.05),
    _run("r5mobile", "mobilenetv2", 1, "in_progress", NOW - timedelta(minutes=10), epochs=3),
    _run("r6resnet", "resnet18", 2, "died", NOW - timedelta(hours=2), epochs=4),
    _run("r7vgg", "vgg16", 1, "completed", NOW - timedelta(days=60), epochs=2,
         test_accuracy=0.85, val_accuracy=0.86, train_accuracy=0.9, experiment="rice",
         duration_sec=300.0),
    # The newest run is an ensemble: no epochs or hyperparameters, registered without alias.
    {k: v for k, v in _run(
        "r8ensemble", "ensemble", 1, "completed", NOW - timedelta(minutes=1), epochs=0,
        step="ensemble", test_accuracy=0.94, test_loss=0.2, duration_sec=12.0,
        registry={"versions": [{"name": "digits-clf", "version": 6, "aliases": []}]}).items()
     if k not in ("epochs_run", "max_epochs", "params")},
]
NO_VALUE = {"None", "none", "nan", "NaN", "NaT", "<NA>"}
LIVE = {"r5mobile": (3, NOW - timedelta(seconds=5)), "r6resnet": (4, NOW - timedelta(minutes=30))}


def _epochs(doc: dict) -> list[dict]:
    return [{"_id": f"{doc['run_id']}:{e}", "run_id": doc["run_id"], "epoch": e,
             "train_loss": round(1.0 / e, 4), "val_loss": round(1.2 / e, 4),
             "train_acc": round(0.5 + 0.08 * e, 4), "val_acc": round(0.45 + 0.08 * e, 4),
             "lr": 0.001, "timestamp": doc["start_time"] + timedelta(seconds=10 * e)}
            for e in range(1, doc.get("epochs_run", 0) + 1)]


def _status(doc: dict) -> dict:
    current, beat = LIVE.get(doc["run_id"], (doc.get("epochs_run", 0), doc.get("end_time")))
    out = {"_id": doc["run_id"], "run_id": doc["run_id"], "run_name": doc["run_name"],
           "model_name": doc["model_name"], "status": doc["status"],
           "start_time": doc["start_time"], "current_epoch": current, "max_epochs": 10,
           "last_heartbeat": beat or doc["start_time"], "updated_at": NOW}
    if doc.get("end_time"):
        out["end_time"] = doc["end_time"]
    return out


@pytest.fixture(scope="module")
def seeded(mongo_server: str) -> str:
    """URI of a database of this module holding RUNS in the mirror's three collections."""
    uri = f"{mongo_server}/dashboard_{uuid4().hex[:8]}"
    client = MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5000)
    db = client[uri.rsplit("/", 1)[1]]
    ensure_indexes(db)
    db[TRAININGS].insert_many(RUNS)
    db[EPOCHS].insert_many([e for doc in RUNS for e in _epochs(doc)])
    db[STATUS].insert_many([_status(doc) for doc in RUNS])
    yield uri
    client.drop_database(db.name)
    client.close()


@pytest.fixture(scope="module")
def db(seeded: str):
    client = MongoClient(seeded, tz_aware=True, serverSelectionTimeoutMS=5000)
    yield client[seeded.rsplit("/", 1)[1]]
    client.close()


def app(monkeypatch: pytest.MonkeyPatch, uri: str, view: str | None = None):
    """The dashboard run once against `uri`, switched to `view` if given."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MONGO_URI", uri)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run(timeout=30)
    if view:
        at.radio(key="view").set_value(view).run(timeout=30)
    assert not at.exception, [e.value for e in at.exception]
    return at


def table(at) -> list[str]:
    """The run id column of the first table (ids cut to 8 characters)."""
    return list(at.dataframe[0].value["run id"])


# --------------------------------------------------------------------------- data layer


def test_data_layer_filters_sorts_and_projects(db):
    frame = data.load_runs(db)
    assert list(frame.columns) == list(data.TABLE_FIELDS)
    assert list(frame["run_id"]) == ["r8ensemble", "r5mobile", "r6resnet", "r2lenet",
                                     "r1resnet", "r3custom", "r4custom", "r7vgg"]  # newest first
    registry = dict(zip(frame["run_id"], frame["registry"], strict=True))
    assert (registry["r1resnet"], registry["r2lenet"]) == ("@champion", "@challenger")
    assert registry["r8ensemble"] == registry["r3custom"] == ""  # no alias / not registered
    assert set(data.load_runs(db, models=["custom_cnn"])["run_id"]) == {"r3custom", "r4custom"}
    assert set(data.load_runs(db, statuses=["completed"])["run_id"]) == {
        "r1resnet", "r2lenet", "r7vgg", "r8ensemble"}
    assert list(data.load_runs(db, digests=["d2"])["run_id"]) == ["r2lenet"]
    assert list(data.load_runs(db, experiments=["rice"])["run_id"]) == ["r7vgg"]
    tag = data.parse_tag_filter("cnnflow.weights_source=random-fallback")
    assert list(data.load_runs(db, tag=tag)["run_id"]) == ["r2lenet"]
    assert len(data.load_runs(db, tag=data.parse_tag_filter("cnnflow.dataset_digest"))) == 8
    old = (NOW - timedelta(days=60)).date()
    start, end = data.day_range(old - timedelta(days=1), old + timedelta(days=1))
    assert list(data.load_runs(db, start=start, end=end)["run_id"]) == ["r7vgg"]
    ordered = data.sort_runs(frame, "test_accuracy", ascending=False)
    assert list(ordered["run_id"][:4]) == ["r8ensemble", "r1resnet", "r7vgg", "r2lenet"]
    assert ordered["test_accuracy"].iloc[4:].isna().all()  # unevaluated runs last
    bars = data.best_test_accuracy_by_model(frame)
    assert list(bars["model_name"]) == ["ensemble", "resnet18", "vgg16", "lenet5"]
    [champion] = data.aliased(db, "champion")
    assert (champion["run_id"], champion["registered"]) == ("r1resnet", "digits-clf v4")
    assert [d["run_id"] for d in data.aliased(db, "challenger")] == ["r2lenet"]
    assert data.aliased(db, "champion", experiments=["rice"]) == []
    names = data.run_names(frame.to_dict("records"))
    assert (names["r1resnet"], names["r6resnet"], names["r8ensemble"]) == (
        "resnet18 v1", "resnet18 v2", "ensemble v1")
    twins = [{"run_id": "aaaa1111", "model_name": "lenet5", "version": 1, "experiment": "x"},
             {"run_id": "bbbb2222", "model_name": "lenet5", "version": 1, "experiment": "y"},
             {"run_id": "cccc3333", "model_name": "lenet5", "version": 1, "experiment": "y"}]
    assert list(data.run_names(twins).values()) == [
        "lenet5 v1 (x)", "lenet5 v1 (y) (bbbb2222)", "lenet5 v1 (y) (cccc3333)"]

    detail = data.run_detail(db, "r1resnet")
    assert "params" not in detail and detail["num_classes"] == 10
    assert data.registry_aliases(detail) == ["digits-clf v4 @champion"]
    curves = data.load_curves(db, ["r1resnet", "r2lenet"])
    assert len(curves) == 8 and list(curves.columns) == list(data.CURVE_FIELDS)
    assert data.load_curves(db, ["r4custom"]).empty
    assert [d["run_id"] for d in data.run_choices(db, "lenet5 v1")] == ["r2lenet"]
    assert data.run_label({"model_name": "lenet5", "version": 3, "step": "train",
                           "run_name": "lenet5-v3-fold2", "run_id": "f00"}) == (
        "lenet5 v3 — train · lenet5-v3-fold2 · f00")  # a run name that says more is kept
    choices = data.run_choices(db)
    assert choices[0]["run_id"] == "r8ensemble"  # newest, but the picker starts on training:
    assert choices[data.default_choice(choices)]["run_id"] == "r5mobile"

    live = data.live_runs(db, now=NOW)
    assert list(live["run_id"]) == ["r5mobile", "r6resnet"]
    assert list(live["progress"]) == [0.3, 0.4]
    assert list(live["heartbeat_age_sec"]) == [5.0, 1800.0]
    assert data.model_colour("resnet18") == data.MODEL_COLOURS["resnet18"]


def test_each_model_keeps_one_colour_in_every_process():
    # One colour per known model, and an unknown one gets the same spare colour whichever
    # process draws it (a colour from hash() would change with PYTHONHASHSEED).
    assert len(set(data.MODEL_COLOURS.values())) == len(data.MODEL_COLOURS)
    names = ["brand_new", "my_net", "vit_tiny", "x", "?"]
    here = [data.model_colour(name) for name in names]
    assert not set(here) & set(data.MODEL_COLOURS.values())
    code = ("import sys; from components.mirror.dashboard.data import model_colour; "
            "print(*(model_colour(n) for n in sys.argv[1:]))")
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        there = subprocess.run([sys.executable, "-c", code, *names], env=env, check=True,
                               capture_output=True, text=True, cwd=ROOT).stdout.split()
        assert there == here, seed


# --------------------------------------------------------------------------- views


def figures(at) -> list[dict]:
    """The plotly figures on the page, as the JSON the browser gets."""
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def no_missing_marks(cells) -> None:
    """A table cell is text or empty: never None / nan / NaT spelled out."""
    cells = list(cells)
    assert cells and all(isinstance(c, str) for c in cells), cells
    assert not NO_VALUE & set(cells), cells


def test_detail_view_shows_the_run_document(monkeypatch, seeded):
    at = app(monkeypatch, seeded)  # the first view is the default
    assert at.title[0].value == "Model detail"
    # It opens on the newest training run, not on the newer ensemble.
    assert at.selectbox(key="detail-run").value == "r5mobile"
    assert at.subheader[0].value == "mobilenetv2 v1 — train, in_progress"
    at.selectbox(key="detail-run").set_value("r1resnet").run(timeout=30)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Train accuracy": "97.0 %", "Val accuracy": "93.0 %",
                       "Test accuracy": "91.0 %", "Best val loss": "0.21",
                       "Test loss": "0.25"}
    values = at.table[0].value["value"].to_dict()
    no_missing_marks(values.values())
    assert values["Classes"] == "10" and values["Feature extraction"] == "yes"
    assert values["Dropout"] == "0.3" and values["Batch size"] == "32"
    assert values["Learning rate"] == "0.001" and values["Early stopping"] == "yes"
    assert values["Weights"] == "imagenet" and values["Image size"] == "64"
    assert values["Duration"] == "2 min 05 s" and values["Status"] == "completed"
    assert values["Step"] == "train" and values["Epochs"] == "5 / 10"
    assert values["Start time"] == (NOW - timedelta(days=2)).strftime("%Y-%m-%d %H:%M UTC")
    loss, acc = figures(at)
    assert [t["name"] for t in acc["data"]] == ["resnet18 v1 — train", "resnet18 v1 — val"]
    assert (loss["layout"]["xaxis"]["title"]["text"], loss["layout"]["yaxis"]["title"]["text"],
            acc["layout"]["yaxis"]["title"]["text"]) == ("epoch", "loss", "accuracy")
    # Accuracy in percent, the axis fitted to the curves (53..90 %) with 2 points either side.
    assert acc["layout"]["yaxis"]["range"] == pytest.approx([51.0, 92.0])
    text = " ".join(m.value for m in at.markdown)
    assert URL + "r1resnet" in text and "digits-clf v4 @champion" in text
    assert len(at.get("plotly_chart")) == 2  # loss and accuracy curves
    assert "3 likely mislabelled images" in text and URL + "li1" in text
    assert [i.url for img in at.get("image") for i in img.proto.imgs] == [EXPLAIN]

    at.selectbox(key="detail-run").set_value("r2lenet").run(timeout=30)
    assert not at.get("image") and "mislabelled" not in " ".join(m.value for m in at.markdown)

    at.text_input(key="detail-search").set_value("custom_cnn v3").run(timeout=30)
    assert at.selectbox(key="detail-run").options == ["custom_cnn v3 — train · r4custom"]
    assert "no epochs" in " ".join(i.value for i in at.info)
    assert not at.get("plotly_chart")

    at.text_input(key="detail-search").set_value("r3custom").run(timeout=30)
    assert "out of memory" in at.error[0].value

    # An ensemble shows what it has, nothing spelled "—" or None for what it has not.
    at.text_input(key="detail-search").set_value("ensemble").run(timeout=30)
    assert at.selectbox(key="detail-run").value == "r8ensemble"  # no training run matches
    assert {m.label: m.value for m in at.metric} == {"Test accuracy": "94.0 %",
                                                     "Test loss": "0.2"}
    values = at.table[0].value["value"].to_dict()
    no_missing_marks(values.values())
    assert "Dropout" not in values and "Epochs" not in values and values["Step"] == "ensemble"
    assert "no training epochs of its own" in " ".join(c.value for c in at.caption)
    assert not at.info


TABLE_TITLES = ["model", "version", "registry", "train accuracy", "val accuracy",
                "test accuracy", "dropout", "batch size", "learning rate", "duration",
                "start time", "status", "run id"]


def test_comparison_view_filters_and_sorts(monkeypatch, seeded):
    at = app(monkeypatch, seeded, "Model comparison")
    # The champion (and challenger) of the registered model head the view.
    assert at.markdown[0].value.splitlines() == [
        "**Champion:** resnet18 v1 — test accuracy 91.0 % (`digits-clf v4 @champion`)  ",
        "**Challenger:** lenet5 v1 — test accuracy 80.0 % (`digits-clf v5 @challenger`)"]
    shown = at.dataframe[0].value
    assert list(shown.columns) == TABLE_TITLES and len(shown) == 8
    no_missing_marks(shown.to_numpy().ravel())
    rows = {r["run id"]: r for r in shown.to_dict("records")}
    assert rows["r1resnet"]["registry"] == "@champion"
    assert rows["r2lenet"]["registry"] == "@challenger"
    assert (rows["r1resnet"]["test accuracy"], rows["r1resnet"]["duration"],
            rows["r1resnet"]["learning rate"], rows["r1resnet"]["batch size"]) == (
        "91.0 %", "2 min 05 s", "0.001", "32")
    assert rows["r1resnet"]["start time"] == (NOW - timedelta(days=2)).strftime(
        "%Y-%m-%d %H:%M UTC")
    ensemble = rows["r8ensemb"]  # run ids cut to 8 characters, as in the report
    assert ensemble["test accuracy"] == "94.0 %" and ensemble["dropout"] == ""
    assert ensemble["batch size"] == ensemble["learning rate"] == ensemble["registry"] == ""

    assert len(at.get("plotly_chart")) == 3  # overlaid loss, accuracy, test accuracy bars
    # The three best training runs by test accuracy are overlaid by default (the ensemble has
    # no curves), each legend entry `model vN — split`.
    assert set(at.multiselect(key="cmp-chosen").value) == {"r1resnet", "r7vgg", "r2lenet"}
    loss, acc, bars = figures(at)
    assert {t["name"] for t in acc["data"]} >= {"resnet18 v1 — train", "lenet5 v1 — val"}
    layout = bars["layout"]
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == (
        "model", "best test accuracy")
    assert list(bars["data"][0]["x"]) == ["ensemble", "resnet18", "vgg16", "lenet5"]
    assert list(bars["data"][0]["text"]) == ["94.0 %", "91.0 %", "85.0 %", "80.0 %"]
    assert layout["yaxis"]["range"] == pytest.approx([78.0, 96.0])  # 80..94 %, not 0..100

    at.selectbox(key="cmp-sort").set_value("test_accuracy").run(timeout=30)
    assert table(at)[:4] == ["r8ensemb", "r1resnet", "r7vgg", "r2lenet"]
    at.toggle(key="cmp-asc").set_value(True).run(timeout=30)
    assert table(at)[:3] == ["r2lenet", "r7vgg", "r1resnet"]
    at.multiselect(key="cmp-models").set_value(["custom_cnn"]).run(timeout=30)
    assert sorted(table(at)) == ["r3custom", "r4custom"]
    assert "no run in this table has a test accuracy" in " ".join(
        i.value for i in at.info).lower()
    assert at.markdown[0].value.startswith("**Champion:** resnet18 v1")  # still on top
    at.multiselect(key="cmp-models").set_value([])
    at.multiselect(key="cmp-status").set_value(["completed", "died"]).run(timeout=30)
    assert sorted(table(at)) == ["r1resnet", "r2lenet", "r6resnet", "r7vgg", "r8ensemb"]
    at.multiselect(key="cmp-status").set_value([])
    at.multiselect(key="cmp-exp").set_value(["rice"]).run(timeout=30)
    assert table(at) == ["r7vgg"]
    assert "No registry version holds `@champion` yet" in " ".join(c.value for c in at.caption)
    at.multiselect(key="cmp-exp").set_value([])
    at.text_input(key="cmp-tag").set_value("cnnflow.weights_source=random-fallback")
    at.run(timeout=30)
    assert table(at) == ["r2lenet"]
    at.multiselect(key="cmp-digest").set_value(["d1"]).run(timeout=30)
    assert "No run matches these filters." in [i.value for i in at.info]
    assert not at.exception


def test_time_filter_view_defaults_to_the_last_30_days(monkeypatch, seeded):
    at = app(monkeypatch, seeded, "Time filter")
    assert sorted(table(at)) == sorted(r["run_id"][:8] for r in RUNS if r["run_id"] != "r7vgg")
    old = (NOW - timedelta(days=60)).date()
    at.date_input(key="time-range").set_value((old - timedelta(days=1), old)).run(timeout=30)
    assert table(at) == ["r7vgg"]
    at.date_input(key="time-range").set_value(
        (old - timedelta(days=30), old - timedelta(days=20))).run(timeout=30)
    assert at.info[0].value.startswith("No run started between")


def test_live_view_shows_running_and_died_runs(monkeypatch, seeded):
    at = app(monkeypatch, seeded, "Live monitoring")
    assert [w.value for w in at.warning][0].startswith("resnet18 · resnet18-v2: died")
    assert "**mobilenetv2 · mobilenetv2-v1** — in progress" in [m.value for m in at.markdown]
    bars = at.get("progress")
    assert [b.proto.value for b in bars] == [30, 40]
    metrics = [(m.label, m.value) for m in at.metric]
    assert ("Train loss", "0.3333") in metrics and ("Val acc", "69.0 %") in metrics
    assert len(at.get("plotly_chart")) == 4  # two runs x (loss, accuracy)
    # Switching views keeps working after the fragment ran.
    at.radio(key="view").set_value("Model comparison").run(timeout=30)
    assert len(table(at)) == 8


def test_empty_database_and_unreachable_mongo(monkeypatch, mongo_server):
    empty = f"{mongo_server}/dashboard_empty_{uuid4().hex[:8]}"
    for view in ("Model detail", "Model comparison", "Time filter"):
        at = app(monkeypatch, empty, view)
        assert at.info[0].value.startswith("No runs in the mirror yet")
    at = app(monkeypatch, empty, "Live monitoring")
    assert at.info[0].value.startswith("No run is in progress")

    closed = f"mongodb://alice:s3cret@127.0.0.1:{free_port()}/cnnflow"
    for view in ("Model comparison", "Live monitoring"):
        at = app(monkeypatch, closed, view)
        [error] = at.error
        assert "alice:***@127.0.0.1" in error.value and "s3cret" not in error.value
        assert "is not reachable" in error.value and "\n" not in error.value
        assert "cnnflow sync --follow" in at.info[0].value and "cnnflow up" in at.info[0].value


# --------------------------------------------------------------------------- the command


def _serve_dashboard(uri: str, port: int):
    """`cnnflow dashboard --port <port>` in the background, its output in a pipe."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MONGO_URI": uri}
    return subprocess.Popen([str(Path(sys.executable).parent / "cnnflow"), "dashboard",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_healthy(port: int, proc, timeout: float = 45.0) -> None:
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError("dashboard did not answer")


def _stop(proc) -> str:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except Exception:  # noqa: BLE001 - a server that ignores SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def test_dashboard_command_serves_the_app_on_loopback(seeded):
    import requests

    port = free_port()
    proc = _serve_dashboard(seeded, port)
    try:
        _wait_healthy(port, proc)
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.ok and "<html" in page.text.lower()
    finally:
        out = _stop(proc)
    assert f"dashboard: http://127.0.0.1:{port}" in out


# --------------------------------------------------------------------------- in a browser

# What each view must show once drawn, how many charts and tables (seeded RUNS; the time
# view leaves out r7vgg); the detail view opens on the newest training run.
VISIBLE = {"Model detail": ("mobilenetv2 v1 — train", 2, 0),
           "Model comparison": ("8 runs", 3, 1), "Time filter": ("7 runs", 0, 1),
           "Live monitoring": ("died", 4, 0)}
VIEWPORT = {"width": 1920, "height": 2200}  # a desktop screen, tall enough for every chart
DRAWN = ("([charts, tables]) => document.querySelectorAll('.js-plotly-plot .main-svg').length"
         " >= charts && document.querySelectorAll('[data-testid=stDataFrameResizable] canvas')"
         ".length >= tables")


def _shot(page, name: str, text: str, charts: int, tables: int = 0) -> None:
    """Wait until `text`, the charts and the tables are drawn, then keep a screenshot."""
    page.get_by_text(text).first.wait_for(timeout=20000)
    page.wait_for_function(DRAWN, arg=[charts, tables], timeout=20000)
    page.wait_for_timeout(800)  # the table's canvas and the charts' transitions settle
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_each_view_in_headless_chromium(seeded):
    """The served page as a user sees it: each view drawn by a real browser, screenshots kept."""
    sync_playwright = playwright_or_skip()
    port = free_port()
    proc = _serve_dashboard(seeded, port)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        _wait_healthy(port, proc)
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"http://127.0.0.1:{port}/", timeout=30000)
            sidebar = page.locator('[data-testid="stSidebar"]')
            for view, (text, charts, tables) in VISIBLE.items():
                sidebar.get_by_text(view, exact=True).click(timeout=20000)
                page.get_by_role("heading", name=view).wait_for(timeout=20000)
                _shot(page, view.lower().replace(" ", "_"), text, charts, tables)
            # The live panel redraws itself every 2 s without a click.
            stamp = page.get_by_text("Refreshed ").first
            first = stamp.inner_text()
            page.wait_for_function(
                "t => ![...document.querySelectorAll('p')].some(p => p.innerText === t)",
                arg=first, timeout=10000)
            assert page.get_by_text("Refreshed ").first.inner_text() != first
            assert sidebar.get_by_text("Live monitoring", exact=True).is_visible()
            # The champion's own page: found by the search box.
            sidebar.get_by_text("Model detail", exact=True).click(timeout=20000)
            search = page.get_by_label("Search runs (model, version or run id)")
            search.fill("resnet18 v1")
            search.press("Enter")
            _shot(page, "model_detail_champion", "digits-clf v4 @champion", 2)
            browser.close()
    finally:
        _stop(proc)
    assert {p.name for p in SCREENSHOTS.glob("*.png")} >= {
        "live_monitoring.png", "model_comparison.png", "model_detail.png", "time_filter.png",
        "model_detail_champion.png"}


# --------------------------------------------------------------------------- no mirror, stopping

NO_MONGO = "no MongoDB server: run `cnnflow up` or set MONGO_URI"


def test_no_mirror_configured_is_the_one_line_on_the_page(monkeypatch, tmp_path):
    """Neither MONGO_URI nor a server `cnnflow up` started: the page says so, guesses nothing."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("MONGO_URI", raising=False)
    monkeypatch.setenv("CNNFLOW_HOME", str(tmp_path / "home"))
    for view in ("Model comparison", "Live monitoring"):
        at = AppTest.from_file(APP, default_timeout=30)
        at.run(timeout=30)
        at.radio(key="view").set_value(view).run(timeout=30)
        assert not at.exception, [e.value for e in at.exception]
        assert [e.value for e in at.error] == [NO_MONGO]
        assert "cnnflow up" in at.info[0].value


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sigterm_to_the_command_stops_streamlit_and_frees_the_port(tmp_path):
    import signal
    import socket

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MONGO_URI"}
    env["CNNFLOW_HOME"] = str(tmp_path / "home")  # no mirror at all: warned, served anyway
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cnnflow"), "dashboard",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    children: list[int] = []
    try:
        _wait_healthy(port, proc)
        children = _children(proc.pid)
        assert children, "streamlit runs as a child process"
        os.kill(proc.pid, signal.SIGTERM)  # the command alone, as `kill` or a supervisor does
        out, _ = proc.communicate(timeout=30)  # EOF only once the child closed the pipe too
    finally:  # on failure: leave nothing listening (a left-over child is the bug itself)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if b"streamlit" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert f"warning: {NO_MONGO}" in out.splitlines()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
