"""`cnnflow export`: ONNX fp32 and int8 exports of a real trained model, checked against it on
its test split, logged and registered when they pass their gate; served by a real
`mlflow models serve`, evaluated by `cnnflow evaluate --model-uri` - real server, real runs."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner
from helpers import BIN, runs_of, serve_model, subprocess_env

from components.serving.export import (
    FORMATS,
    GATES,
    INT8_MIN_AGREEMENT,
    ExportError,
    export_fp32,
    int8_gate,
)
from pipelines.cli import cli

NAME = "export-main"
METRICS = ("max_abs_prob_diff", "top1_agreement", "test_acc", "test_acc_delta",
           "model_size_mb", "latency_ms_p50", "latency_ms_p95", "throughput_images_per_sec",
           "passed")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def exported(trained_pair):
    """One `cnnflow export` of the pair's custom_cnn to both formats (calibrated on its 36
    train images): the export run and the registered versions by format."""
    client = mlflow.MlflowClient(trained_pair.uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained_pair.uri)
        result = invoke("export", "--run-id", trained_pair.runs["custom_cnn"],
                        "--registered-model", NAME, "--calibration-images", "36",
                        "--latency-runs", "5")
    assert result.exit_code == 0, result.output
    [run] = runs_of(client, "pair", step="export")
    versions = {v.tags["cnnflow.format"]: v
                for v in client.search_model_versions(f"name = '{NAME}'")}
    return client, run, versions, result.output


def test_export_logs_parity_and_registers_what_passes_its_gate(exported, trained_pair):
    client, run, versions, output = exported
    source = trained_pair.runs["custom_cnn"]
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("export-v")
    assert tags["cnnflow.source_run"] == source
    assert {f"{fmt}.{k}" for fmt in FORMATS for k in METRICS} <= set(m)
    assert m["onnx.max_abs_prob_diff"] < 1e-4 and m["onnx.top1_agreement"] == 1.0
    assert m["onnx.test_acc"] == m["pytorch.test_acc"] and m["onnx.passed"] == 1.0
    for fmt in FORMATS:
        assert 0 < m[f"{fmt}.model_size_mb"] and 0 < m[f"{fmt}.latency_ms_p50"]
        checks = {k: m[f"{fmt}.{k}"] for k in METRICS}
        reason = GATES[fmt](checks)  # the gate, re-applied to what was logged
        assert m[f"{fmt}.passed"] == float(not reason)
        if reason:  # rejected: the reason on the run, nothing registered
            assert tags[f"cnnflow.export.{fmt}"] == f"rejected: {reason}" and fmt not in versions
            continue
        version = versions[fmt]
        assert tags[f"cnnflow.export.{fmt}"] == f"registered {NAME} v{version.version}"
        assert version.tags["cnnflow.source_run"] == source
        assert version.tags["cnnflow.model"] == "custom_cnn"
        assert float(version.tags["test_acc"]) == m[f"{fmt}.test_acc"]
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.name == f"custom_cnn-{fmt}" and logged.tags["cnnflow.format"] == fmt
    int8_quantised = m["int8.model_size_mb"] < m["onnx.model_size_mb"]
    assert int8_quantised, "the int8 graph must hold int8 weights"
    aliases = client.get_registered_model(NAME).aliases
    assert "champion" not in aliases  # registration never promotes
    assert "not promoted" in output


def test_mobilenetv2_exports_to_both_formats(pair_client, trained_pair):
    """The backbone users deploy (depthwise convolutions, ReLU6, batch norm) at 32 px."""
    from components.steps.params import TrainParams
    from components.steps.train import train

    params = TrainParams(data=str(trained_pair.data), experiment="pair", model="mobilenetv2",
                         epochs=1, image_size=32, batch_size=8, num_workers=0, weights="none",
                         patience=0, augmentation="none")
    source = train(params, trained_pair.uri, progress=False, log=lambda s: None).run_id
    result = invoke("export", "--run-id", source, "--registered-model", "export-mobile",
                    "--calibration-images", "36", "--latency-runs", "2")
    assert result.exit_code == 0, result.output
    run = runs_of(pair_client, "pair", step="export")[-1]
    m = run.data.metrics
    assert run.data.tags["cnnflow.source_run"] == source
    assert m["onnx.passed"] == 1.0 and m["onnx.max_abs_prob_diff"] < 1e-4
    assert m["int8.model_size_mb"] < m["onnx.model_size_mb"] / 2
    registered = {v.tags["cnnflow.format"]
                  for v in pair_client.search_model_versions("name = 'export-mobile'")}
    assert registered == {f for f in FORMATS if m[f"{f}.passed"] == 1.0}


def test_the_int8_gate_rejects_what_the_issue_says():
    ok = {"test_acc_delta": -0.01, "top1_agreement": INT8_MIN_AGREEMENT}
    assert int8_gate(ok) == ""
    assert "accuracy drop 0.0200" in int8_gate({**ok, "test_acc_delta": -0.02})
    assert "agreement 0.9700" in int8_gate({**ok, "top1_agreement": 0.97})
    assert GATES["onnx"]({"max_abs_prob_diff": 2e-4}) and not GATES["onnx"](
        {"max_abs_prob_diff": 1e-6})
    assert set(GATES) == set(FORMATS)  # every format has its gate


def test_an_int8_export_that_fails_its_gate_is_not_registered(pair_client, trained_pair):
    """lenet5 calibrated on one image: ranges from a single red image clip every other class."""
    result = invoke("export", "--run-id", trained_pair.runs["lenet5"], "--formats", "int8",
                    "--registered-model", "export-gate", "--calibration-images", "1",
                    "--latency-runs", "2")
    assert result.exit_code == 0, result.output
    run = runs_of(pair_client, "pair", step="export")[-1]
    assert run.data.tags["cnnflow.source_run"] == trained_pair.runs["lenet5"]
    reason = int8_gate({k: run.data.metrics[f"int8.{k}"]
                        for k in ("test_acc_delta", "top1_agreement")})
    if not reason:
        pytest.skip("int8 from one calibration image happened to pass its gate here")
    assert run.data.tags["cnnflow.export.int8"] == f"rejected: {reason}"
    assert run.data.metrics["int8.passed"] == 0.0
    assert not pair_client.search_model_versions("name = 'export-gate'")
    assert "rejected" in result.output


@pytest.fixture(scope="module")
def served_onnx(exported, trained_pair, tmp_path_factory: pytest.TempPathFactory):
    """URL of a real `mlflow models serve` of the registered fp32 ONNX version."""
    _, _, versions, _ = exported
    log = tmp_path_factory.mktemp("serve-onnx") / "serve.log"
    with serve_model(f"models:/{NAME}/{versions['onnx'].version}", trained_pair.uri,
                     log) as url:
        yield url


def test_served_onnx_model_answers_like_the_pytorch_model(served_onnx, trained_pair):
    images = sorted(trained_pair.data.rglob("*.png"))[::7]
    payload = {"inputs": {"image": [base64.b64encode(p.read_bytes()).decode("ascii")
                                    for p in images]}}
    response = requests.post(f"{served_onnx}/invocations", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    uri = mlflow.MlflowClient(trained_pair.uri).get_run(
        trained_pair.runs["custom_cnn"]).data.tags["cnnflow.model_uri"]
    torch_rows = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [str(p) for p in images]}))
    assert [row["label"] for row in served] == list(torch_rows["label"])
    for row, (_, ref) in zip(served, torch_rows.iterrows(), strict=True):
        assert row["confidence"] == pytest.approx(ref["confidence"], abs=1e-4)


def test_evaluate_takes_an_exported_version(exported, pair_client):
    _, run, versions, _ = exported
    version = versions["onnx"]
    result = invoke("evaluate", "--model-uri", f"models:/{NAME}/{version.version}",
                    "--register", "false", "--latency-runs", "3")
    assert result.exit_code == 0, result.output
    evaluated = pair_client.get_run(run.info.run_id)  # the version's run: the export run
    assert evaluated.data.tags["cnnflow.evaluated_test_format"] == "onnx"
    assert evaluated.data.metrics["test_acc"] == pytest.approx(
        run.data.metrics["onnx.test_acc"])
    local = pair_client.download_artifacts(run.info.run_id,
                                           "evaluation/test/classification_report.json")
    assert json.loads(Path(local).read_text())["cost"]["format"] == "onnx"


def test_an_ensemble_exports_member_by_member_and_votes_as_before(pair_client, trained_pair):
    a, b = trained_pair.runs["custom_cnn"], trained_pair.runs["lenet5"]
    made = invoke("ensemble", "--run-ids", f"{a},{b}", "--vote", "soft")
    assert made.exit_code == 0, made.output
    ensemble = runs_of(pair_client, "pair", step="ensemble")[-1]
    result = invoke("export", "--run-id", ensemble.info.run_id, "--formats", "onnx",
                    "--registered-model", "export-ensemble", "--latency-runs", "2")
    assert result.exit_code == 0, result.output
    run = runs_of(pair_client, "pair", step="export")[-1]
    m = run.data.metrics
    assert m["onnx.max_abs_prob_diff"] < 1e-4 and m["onnx.passed"] == 1.0
    [version] = pair_client.search_model_versions("name = 'export-ensemble'")
    model = mlflow.pyfunc.load_model(f"models:/export-ensemble/{version.version}")
    inner = model.unwrap_python_model()
    assert inner.format == "onnx" and len(inner.members) == 2
    assert inner.config["vote"] == "soft"
    images = [str(p) for p in sorted(trained_pair.data.rglob("*.png"))[::9]]
    torch_rows = mlflow.pyfunc.load_model(ensemble.data.tags["cnnflow.model_uri"]).predict(
        pd.DataFrame({"image": images}))
    onnx_rows = model.predict(pd.DataFrame({"image": images}))
    assert list(onnx_rows["label"]) == list(torch_rows["label"])
    assert (onnx_rows["confidence"] - torch_rows["confidence"]).abs().max() < 1e-4


def test_mlflow_run_export_fills_the_job_run(pair_client, trained_pair):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(root), "-e", "export", "--env-manager", "local",
         "--experiment-name", "pair", "-P", f"run_id={trained_pair.runs['lenet5']}",
         "-P", "formats=onnx", "-P", "latency_runs=2", "-P", "registered_model=export-job"],
        capture_output=True, text=True, env=subprocess_env(trained_pair.uri), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs_of(pair_client, "pair", step="export")[-1]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("export-v")
    assert run.data.params["formats"] == "onnx" and run.data.metrics["onnx.passed"] == 1.0
    [version] = pair_client.search_model_versions("name = 'export-job'")
    assert version.run_id == run.info.run_id and version.tags["cnnflow.format"] == "onnx"


@pytest.mark.parametrize("args, says", [
    (["--formats", "onnx,tflite"], "unknown export format 'tflite'"),
    (["--calibration-images", "500"], "fewer than --calibration-images 500"),
    (["--calibration-images", "0"], "calibration_images=0 is below 1"),
])
def test_bad_input_is_one_line_and_opens_no_run(pair_client, trained_pair, args, says):
    before = len(runs_of(pair_client, "pair", step="export"))
    result = CliRunner().invoke(cli, ["export", "--run-id", trained_pair.runs["custom_cnn"],
                                      *args])
    assert result.exit_code == 1
    assert says in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert len(runs_of(pair_client, "pair", step="export")) == before


def test_a_run_without_a_model_is_one_line(pair_client):
    exp = pair_client.get_experiment_by_name("pair").experiment_id
    bare = pair_client.create_run(exp).info.run_id
    pair_client.set_terminated(bare)
    result = CliRunner().invoke(cli, ["export", "--run-id", bare])
    assert result.exit_code == 1 and "has no logged model" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_operator_no_exporter_takes_is_named(tmp_path):
    class Eig(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x[:, 0, :3, :3]).real

    with pytest.raises(ExportError, match=r"operator aten[.:]+linalg_eig"):
        export_fp32(Eig(), 8, tmp_path / "eig.onnx", "eig")


def _format_rows(rows, run_id):
    return {r["format"]: r for r in rows if r["run_id"] == run_id}


def test_compare_shows_each_format_beside_the_pytorch_row(exported, trained_pair, pair_client,
                                                          tmp_path):
    import csv

    from components.humanize import number
    from components.tracking.comparison import compare_runs

    _, run, versions, _ = exported
    m, source = run.data.metrics, trained_pair.runs["custom_cnn"]
    result = invoke("compare", "--experiment", "pair", "--sort", "latency_ms_p50", "--out",
                    str(tmp_path))
    assert result.exit_code == 0, result.output
    with (tmp_path / "compare-pair.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    [torch_row] = [r for r in rows if r["run_id"] == source]
    assert torch_row["format"] == "pytorch" and torch_row["step"] == "train"
    formats = _format_rows(rows, run.info.run_id)  # the reference, timed beside the formats
    assert set(formats) == {"pytorch", *FORMATS}
    for fmt, row in formats.items():
        assert (row["model"], row["version"], row["step"], row["run"]) == (
            "custom_cnn", torch_row["version"], "export", run.info.run_name)
        assert row["image_size"] == torch_row["image_size"]  # the source's hyperparameters
        for column in ("test_acc", "model_size_mb", "latency_ms_p50",
                       "throughput_images_per_sec"):
            assert float(row[column]) == m[f"{fmt}.{column}"], (fmt, column)
        assert float(row["latency_speedup"]) == pytest.approx(
            m["pytorch.latency_ms_p50"] / m[f"{fmt}.latency_ms_p50"])
        line = next(li for li in result.output.splitlines()
                    if run.info.run_name in li and f" {fmt} " in li)
        assert number(m[f"{fmt}.test_acc"], "test_acc") in line  # as the report writes it
        assert number(m[f"{fmt}.latency_ms_p50"], "latency_ms_p50") in line
        if fmt == "pytorch":
            assert row["gate"] == row["max_abs_prob_diff"] == row["registry"] == ""
            continue
        for column in ("max_abs_prob_diff", "top1_agreement", "test_acc_delta"):
            assert float(row[column]) == m[f"{fmt}.{column}"], (fmt, column)
        if m[f"{fmt}.passed"] == 1.0:
            assert row["gate"] == "passed"
            assert row["registry"].startswith(f"{NAME} v{versions[fmt].version}")
        else:
            assert row["gate"].startswith("rejected: ") and row["registry"] == ""
    # Sorted by latency, the formats take their places by their own figures.
    order = [r["format"] for r in rows if r["run_id"] == run.info.run_id]
    assert order == sorted(formats, key=lambda f: m[f"{f}.latency_ms_p50"])
    # Unsorted, each export's rows follow the run they were exported from.
    listed = compare_runs(pair_client, "pair")
    at = next(i for i, r in enumerate(listed) if r["run_id"] == source)
    following = []
    for row in listed[at + 1:]:
        if row.get("source_run_id") != source:
            break
        following.append((row["run_id"], row["format"]))
    assert {(run.info.run_id, fmt) for fmt in formats} <= set(following)


def test_the_report_cost_section_has_a_row_per_format(exported, trained_pair, pair_client,
                                                     tmp_path):
    from components.humanize import number
    from components.steps.report import build_report

    _, run, versions, _ = exported
    m = run.data.metrics
    torch_name = pair_client.get_run(trained_pair.runs["custom_cnn"]).info.run_name
    out = build_report(trained_pair.uri, "pair", reports_dir=tmp_path, pdf="false",
                       log=lambda s: None)
    md = out.markdown.read_text()
    cost = md.split("## Cost")[1].split("## Confusion matrices")[0]
    assert "figures/cost.png" in cost
    lines = cost.splitlines()
    at = next(i for i, li in enumerate(lines)
              if li.startswith(f"| custom_cnn | pytorch | {torch_name} |"))
    beside = {li.split(" | ")[1]: li for li in lines[at + 1:at + 2 + len(FORMATS)]}
    assert set(beside) == {"pytorch", *FORMATS}
    for fmt, line in beside.items():
        assert line.startswith(f"| custom_cnn | {fmt} | {run.info.run_name} |")
        for column in ("test_acc", "model_size_mb", "latency_ms_p50",
                       "throughput_images_per_sec"):
            assert f"| {number(m[f'{fmt}.{column}'], column)} |" in line, (fmt, column)
    # Parity, gate and registry version of each exported format: the second table.
    parity = cost.split("**Exported formats against PyTorch**")[1].splitlines()
    for fmt in FORMATS:
        line = next(li for li in parity
                    if li.startswith(f"| custom_cnn | {fmt} | {run.info.run_name} |"))
        if m[f"{fmt}.passed"] == 1.0:
            assert f"| {number(m[f'{fmt}.top1_agreement'], 'top1_agreement')} |" in line
            assert "| passed |" in line and f"{NAME} v{versions[fmt].version}" in line
    assert run.info.run_name in out.html.read_text()
