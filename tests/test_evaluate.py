"""`cnnflow evaluate` and `cnnflow compare` against a real MLflow server and real models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sklearn.metrics import precision_recall_fscore_support

from components.humanize import number
from components.nn.models import count_parameters
from pipelines.cli import cli

FIGURES = {"confusion_matrix.png", "confusion_matrix_normalized.png", "per_class_accuracy.png",
           "misclassified.png", "reliability.png", "classification_report.json",
           "predictions.csv"}
COST = ("params_count", "model_size_mb", "latency_ms_p50", "latency_ms_p95",
        "throughput_images_per_sec", "peak_memory_mb")


@pytest.fixture
def client(pair_client: MlflowClient) -> MlflowClient:
    return pair_client


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def manifest_split(client: MlflowClient, run_id: str, data: Path, split: str, tmp: Path):
    local = client.download_artifacts(run_id, "data/manifest.csv", str(tmp))
    with open(local) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    return [str(data / r["path"]) for r in rows], np.array([int(r["class_index"]) for r in rows])


def versions(client: MlflowClient, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


def test_evaluate_logs_correct_metrics_figures_cost_and_registers(client, trained_pair,
                                                                  tmp_path):
    run_id = trained_pair.runs["custom_cnn"]
    result = invoke("evaluate", "--run-id", run_id, "--registered-model", "eval-main",
                    "--latency-runs", "5")
    assert result.exit_code == 0, result.output
    assert "test_acc" in result.output and "eval-main v1" in result.output
    # The first version became champion: the next step serves it.
    assert "next: mlflow models serve -m models:/eval-main@champion" in result.output
    run = client.get_run(run_id)
    m = run.data.metrics

    # Hand computation from the model's own predictions on the run's own test split.
    paths, labels = manifest_split(client, run_id, trained_pair.data, "test", tmp_path)
    model = mlflow.pyfunc.load_model(run.data.tags["cnnflow.model_uri"])
    out = model.predict(pd.DataFrame({"image": paths}))
    classes = [f"k{i}" for i in range(6)]
    probs = out[[f"prob_{c}" for c in classes]].to_numpy()
    preds = probs.argmax(1)
    assert m["test_acc"] == pytest.approx((preds == labels).mean())
    assert m["test_loss"] == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(),
                                           rel=1e-4)
    top5 = np.argsort(-probs, 1)[:, :5]
    assert m["test_top5_acc"] == pytest.approx((top5 == labels[:, None]).any(1).mean())
    for i, name in enumerate(classes):
        mask = labels == i
        assert m[f"test_acc_{name}"] == pytest.approx((preds[mask] == i).mean())
        assert m[f"test_loss_{name}"] == pytest.approx(
            -np.log(probs[mask, i]).mean(), rel=1e-4)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, average=avg,
                                                     labels=range(6), zero_division=0)
        assert (m[f"test_precision_{avg}"], m[f"test_recall_{avg}"], m[f"test_f1_{avg}"]) == \
            pytest.approx((p, r, f))
    conf, correct = probs.max(1), preds == labels
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum((bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
              for b in range(15) if (bins == b).any())
    assert m["test_ece"] == pytest.approx(ece, abs=1e-6)

    files = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation/test")}
    assert FIGURES <= files
    # The Grad-CAM gallery (default 8 highest-loss + at most 8 from confusion pairs), its
    # overview named by the run's tag for the mirror and the report.
    gallery = {Path(f.path).name for f in client.list_artifacts(run_id,
                                                                "evaluation/test/explain")}
    assert {"overview.png", "gallery.csv"} <= gallery and 8 <= len(gallery) - 2 <= 16
    assert run.data.tags["cnnflow.explain_overview"] == "evaluation/test/explain/overview.png"
    report = json.loads(Path(client.download_artifacts(
        run_id, "evaluation/test/classification_report.json", str(tmp_path))).read_text())
    expected = np.zeros((6, 6), dtype=int)
    np.add.at(expected, (labels, preds), 1)
    assert report["confusion_matrix"] == expected.tolist()
    assert report["sklearn"]["accuracy"] == pytest.approx(m["test_acc"])

    for key in COST:
        assert m[key] > 0, key
    assert m["params_count"] == count_parameters(model.unwrap_python_model().model)
    assert m["latency_ms_p95"] >= m["latency_ms_p50"]
    assert report["cost"]["device"] == "cpu"

    # Registered as v1 of eval-main, tagged, challenger; the first version becomes champion.
    (version,) = versions(client, "eval-main")
    assert version.run_id == run_id and version.tags["cnnflow.run_id"] == run_id
    assert version.tags["cnnflow.dataset_digest"] == run.data.tags["cnnflow.dataset_digest"]
    assert float(version.tags["test_acc"]) == pytest.approx(m["test_acc"])
    assert version.tags["cnnflow.model"] == "custom_cnn"
    assert client.get_model_version_by_alias("eval-main", "champion").version == "1"
    assert client.get_model_version_by_alias("eval-main", "challenger").version == "1"
    assert version.tags["cnnflow.promotion"] == "promoted"

    # The val split is scored too (it chooses among candidates), recorded on the version; the
    # training run's val_loss/val_acc stay its per-epoch curves.
    paths, labels = manifest_split(client, run_id, trained_pair.data, "val", tmp_path)
    out = model.predict(pd.DataFrame({"image": paths}))
    val_preds = out[[f"prob_{c}" for c in classes]].to_numpy().argmax(1)
    assert float(version.tags["val_acc"]) == pytest.approx((val_preds == labels).mean())
    assert {"val_loss", "val_f1_macro", "val_top5_acc", "val_ece"} <= set(version.tags)
    epochs = int(m["epochs_run"])
    for curve in ("val_acc", "val_loss"):
        assert [x.step for x in client.get_metric_history(run_id, curve)] == \
            list(range(1, epochs + 1))
    assert m["val_f1_macro"] == pytest.approx(float(version.tags["val_f1_macro"]))
    # Test metrics are linked to the logged model: its page in the MLflow UI shows them.
    model_id = run.data.tags["cnnflow.model_uri"].removeprefix("models:/")
    linked = {x.key: x.value for x in client.get_logged_model(model_id).metrics}
    assert linked["test_acc"] == pytest.approx(m["test_acc"])
    assert {"test_loss", "test_f1_macro", "latency_ms_p50"} <= set(linked)
    assert f"#/experiments/{run.info.experiment_id}/runs/{run_id}" in result.output

    # The same model through its registry URI: same numbers, into the same run.
    result = invoke("evaluate", "--model-uri", "models:/eval-main@champion", "--register",
                    "false", "--cost", "false")
    assert result.exit_code == 0, result.output
    assert "next: cnnflow compare --experiment pair" in result.output  # nothing registered
    assert client.get_run(run_id).data.metrics["test_acc"] == pytest.approx(m["test_acc"])
    assert len(versions(client, "eval-main")) == 1


def test_val_split_is_prefixed_leaves_epoch_curves_alone_and_registers_nothing(client,
                                                                               trained_pair):
    run_id = trained_pair.runs["lenet5"]
    before = sorted(x.step for x in client.get_metric_history(run_id, "val_loss"))
    result = invoke("evaluate", "--run-id", run_id, "--split", "val", "--cost", "false",
                    "--registered-model", "eval-val", "--explain-images", "0")
    assert result.exit_code == 0, result.output
    m = client.get_run(run_id).data.metrics
    assert {"val_f1_macro", "val_top5_acc", "val_ece", "val_acc_k0"} <= set(m)
    assert sorted(x.step for x in client.get_metric_history(run_id, "val_loss")) == before
    files = {Path(f.path).name for f in client.list_artifacts(run_id, "evaluation/val")}
    assert "confusion_matrix.png" in files and "explain" not in files  # --explain-images 0
    assert versions(client, "eval-val") == []


def fake_run(client: MlflowClient, experiment: str, tags: dict[str, str],
             params: dict[str, str] | None = None, manifest: list[dict] | None = None,
             tmp: Path | None = None) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags=tags)
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    if manifest is not None:
        path = tmp / "manifest.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "class_index", "split"])
            writer.writeheader()
            writer.writerows(manifest)
        client.log_artifact(run.info.run_id, str(path), artifact_path="data")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_bad_input_is_one_line_and_changes_no_registry(client, trained_pair, tmp_path):
    source = client.get_run(trained_pair.runs["custom_cnn"])
    uri = source.data.tags["cnnflow.model_uri"]
    no_model = fake_run(client, "bad-eval", {"cnnflow.step": "train"})
    rows = [{"path": "k0/img000.png", "label": "k0", "class_index": 0, "split": "train"},
            {"path": "k1/img000.png", "label": "k1", "class_index": 1, "split": "train"}]
    empty_test = fake_run(client, "bad-eval", {"cnnflow.step": "train", "cnnflow.model_uri": uri},
                          {"data": str(trained_pair.data)}, rows, tmp_path)
    missing = fake_run(client, "bad-eval", {"cnnflow.step": "train", "cnnflow.model_uri": uri},
                       {"data": str(trained_pair.data)},
                       [{**rows[0], "split": "test", "path": "k0/gone.png"}], tmp_path)
    cases = [
        (["--run-id", "0123456789abcdef0123456789abcdef"], "does not exist"),
        (["--run-id", no_model], "has no logged model"),
        (["--model-uri", "models:/eval-bad@champion"], "has no alias 'champion'"),
        (["--model-uri", "models:/eval-bad/7"], "has no version 7"),
        (["--run-id", empty_test], "test split of run"),
        (["--run-id", missing], "missing"),
        ([], "exactly one of --run-id or --model-uri"),
        (["--run-id", no_model, "--split", "train"], "split must be val or test"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["evaluate", *args, "--registered-model", "eval-bad"])
        assert message in error_line(result), (args, result.output)
    with pytest.raises(MlflowException):  # the registered model was never created
        client.get_registered_model("eval-bad")


def test_compare_prints_sorts_and_writes_tables(client, trained_pair, tmp_path):
    result = invoke("compare", "--experiment", "pair", "--sort", "val_acc", "--out",
                    str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "custom_cnn-v1" in result.output and "lenet5-v1" in result.output
    with (tmp_path / "compare-pair.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r["step"] == "train"]
    assert {r["run_id"] for r in train_rows} >= set(trained_pair.runs.values())
    accs = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    assert accs == sorted(accs, reverse=True)
    assert {"model", "version", "train_acc", "test_acc", "test_loss", "lr", "batch_size",
            "latency_ms_p50"} <= set(rows[0])
    md = (tmp_path / "compare-pair.md").read_text()
    assert md.startswith("| run | model | version |") and "custom_cnn-v1" in md

    # The terminal: a readable default set of columns, humanized, within 120 characters.
    lines = [li for li in result.output.splitlines() if not li.startswith("wrote ")]
    assert lines[0].startswith("run ") and "val accuracy" in lines[0]
    assert "learning rate" not in lines[0] and max(map(len, lines)) <= 120
    best = next(r for r in rows if r["val_acc"])
    assert any(li.startswith(best["run"]) and number(float(best["val_acc"]), "val_acc") in li
               for li in lines)

    result = invoke("compare", "--experiment", "pair", "--sort", "test_loss", "--reverse",
                    "true", "--columns", "run,lr,dropout", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    header, *body = result.output.splitlines()
    assert header.split() == ["run", "learning", "rate", "dropout"]
    first = next(r for r in rows if r["run"] == "custom_cnn-v1")
    assert any(li.split() == ["custom_cnn-v1", number(float(first["lr"]), "lr"),
                              number(float(first["dropout"]), "dropout")] for li in body)
    losses = [float(r["test_loss"]) for r in rows if r["test_loss"]]
    with (tmp_path / "compare-pair.csv").open() as fh:  # reversed: the worst loss first
        reversed_losses = [float(r["test_loss"]) for r in csv.DictReader(fh) if r["test_loss"]]
    assert reversed_losses == sorted(losses, reverse=True)
    result = CliRunner().invoke(cli, ["compare", "--experiment", "pair", "--columns",
                                      "run,nope", "--out", str(tmp_path)])
    assert "unknown column 'nope' for --columns: use one of run, model" in error_line(result)
    result = CliRunner().invoke(cli, ["compare", "--experiment", "pair", "--sort", "nope",
                                      "--out", str(tmp_path)])
    assert "unknown column 'nope'" in error_line(result)
    result = CliRunner().invoke(cli, ["compare", "--experiment", "no-such-exp", "--out",
                                      str(tmp_path)])
    assert "does not exist" in error_line(result)


# --------------------------------------------------------------------------- cost figures


def test_cost_figures_are_pinned_and_flagged_by_their_own_numbers(client, trained_pair,
                                                                    tmp_path):
    """Measured on an idle and on a saturated CPU: every figure is there with the conditions
    behind it; `cost_reliable` is exactly what `reliability` says of the measured numbers
    (which machine state trips it is the machine's business, not the test's)."""
    import os
    import subprocess
    import sys

    from components.data.datasets import load_rgb
    from components.serving.cost import SPREAD_LIMIT, measure_cost, reliability
    from components.serving.predict import load_model

    run = client.get_run(trained_pair.runs["lenet5"])
    model = load_model(run.data.tags["cnnflow.model_uri"])
    images = [load_rgb(p) for p in sorted(trained_pair.data.rglob("*.png"))[:4]]

    def check(cost) -> None:
        m, c = cost.metrics, cost.context
        assert {"params_count", "model_size_mb", "latency_ms_p50", "latency_ms_p95",
                "throughput_images_per_sec", "cost_reliable"} <= set(m)
        assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"]
        assert m["throughput_images_per_sec"] == pytest.approx(4 * 1000 / c["batch_ms_p50"])
        assert c["latency_runs"] >= 5 and c["throughput_batches"] >= 3
        assert c["latency_seconds"] >= 0.05 and c["throughput_seconds"] >= 0.05
        assert c["torch_threads"] >= 1 and c["cpu_count"] == os.cpu_count()
        reasons = reliability(m["latency_ms_p50"], m["latency_ms_p95"], c["batch_ms_p50"],
                              c["batch_ms_p95"], c["load_avg_1m"], c["cpu_count"])
        assert c["unreliable"] == reasons and m["cost_reliable"] == float(not reasons)
        assert bool(cost.note) == bool(reasons)

    check(measure_cost(model, images, 4, latency_runs=5, min_seconds=0.05))
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2 * os.cpu_count())]
    try:
        check(measure_cost(model, images, 4, latency_runs=5, min_seconds=0.05))
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()

    # The decision itself, on a measured median: a tail past the limit, or a load past the
    # cores, is a reason; a tight spread on an idle machine is none.
    p50 = measure_cost(model, images, 4, latency_runs=5, min_seconds=0.0).metrics[
        "latency_ms_p50"]
    assert reliability(p50, 1.5 * p50, 10 * p50, 12 * p50, load=0.5, cores=2) == []
    [tail] = reliability(p50, (SPREAD_LIMIT + 1) * p50, 10 * p50, 12 * p50, load=0.5, cores=2)
    assert tail.startswith("latency p95")
    [batch] = reliability(p50, p50, 10 * p50, 10 * (SPREAD_LIMIT + 1) * p50, load=0, cores=2)
    assert batch.startswith("batch time p95")
    [load] = reliability(p50, p50, p50, p50, load=4.5, cores=2)
    assert load == "load average 4.50 > 2 cores"


def test_evaluate_logs_the_cost_conditions(client, trained_pair, tmp_path):
    run_id = trained_pair.runs["lenet5"]
    result = invoke("evaluate", "--run-id", run_id, "--register", "false", "--latency-runs", "5")
    assert result.exit_code == 0, result.output
    m = client.get_run(run_id).data.metrics
    assert m["cost_reliable"] in (0.0, 1.0)
    report = json.loads(Path(client.download_artifacts(
        run_id, "evaluation/test/classification_report.json", str(tmp_path))).read_text())
    cost = report["cost"]
    assert {"load_avg_1m", "cpu_count", "torch_threads", "latency_runs", "batch_ms_p95",
            "unreliable"} <= set(cost)
    assert cost["latency_runs"] >= 5
    assert ("cost figures unreliable" in result.output) == (m["cost_reliable"] == 0.0)
