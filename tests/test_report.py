"""`cnnflow report`: the experiment's document, built from real runs on a real server."""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import make_image_folder
from mlflow import MlflowClient

from components.steps.report import PDF_ENV, ReportError, build_report, find_pdf_converter
from pipelines.cli import cli

EXPERIMENT = "report-exp"
quiet = {"log": lambda s: None}


@pytest.fixture(scope="module")
def experiment(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    """eda, two tiny trained + evaluated (registered, promoted) models, their ensemble and a
    two-trial tuning study."""
    from components.steps.eda import run_eda
    from components.steps.ensemble import run_ensemble
    from components.steps.evaluate import evaluate
    from components.steps.params import (
        EdaParams,
        EnsembleParams,
        EvalParams,
        TrainParams,
        TuneParams,
    )
    from components.steps.train import train
    from components.steps.tune import run_tune

    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "rep3", {"red": 8, "green": 8, "blue": 8})
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        eda = run_eda(EdaParams(data=str(data), experiment=EXPERIMENT,
                                reports_dir=str(root / "eda"), num_workers=0),
                      mlflow_server, progress=False, **quiet)
        for model in ("custom_cnn", "lenet5"):
            params = TrainParams(data=str(data), experiment=EXPERIMENT, model=model, epochs=1,
                                 image_size=16, batch_size=8, num_workers=0, weights="none",
                                 patience=0, augmentation="none")
            runs[model] = train(params, mlflow_server, progress=False, **quiet).run_id
            evaluate(EvalParams(run_id=runs[model], latency_runs=2, num_workers=0,
                                device="cpu"), mlflow_server, **quiet)
        ens = run_ensemble(EnsembleParams(run_ids=",".join(runs.values()), device="cpu",
                                          num_workers=0), mlflow_server, **quiet)
        tune = run_tune(TuneParams(space="lr: [0.001, 0.01]", data=str(data),
                                   experiment=EXPERIMENT, n_trials=2, epochs=1, sampler="grid",
                                   pruner="none", weights="none", image_size=16,
                                   augmentation="none", num_workers=0), mlflow_server, **quiet)
    client = MlflowClient(mlflow_server)
    names = {m: client.get_run(r).info.run_name for m, r in runs.items()}
    return SimpleNamespace(uri=mlflow_server, runs=runs, names=names, eda=eda.run_id,
                           ensemble=ens.run_id, ensemble_name=ens.run_name,
                           tune=tune.run_name)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text())
    parser.close()
    return parser


def test_report_has_every_section_figure_and_model(experiment, tracking, tmp_path):
    out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="false", **quiet)
    assert out.folder == tmp_path / EXPERIMENT and out.pdf is None
    umask = os.umask(0)
    os.umask(umask)
    assert out.folder.stat().st_mode & 0o777 == 0o777 & ~umask  # as readable as a mkdir
    md = out.markdown.read_text()
    for heading in ("# Experiment report: report-exp", "## Dataset", "## Models compared",
                    "## Training curves", "## Cost", "## Confusion matrices", "## Tuning",
                    f"### {experiment.tune}", "## Registry"):
        assert heading in md, heading
    tuning = md.split("## Tuning")[1].split("## Registry")[0]
    assert "best val_loss" in tuning and "| lr |" in tuning and "figures/tune-" in tuning
    refs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert refs and all((out.folder / r).is_file() for r in refs)
    assert {p.name for p in out.figures} == {Path(r).name for r in refs}
    names = " ".join(refs)
    for expected in ("eda-class_counts", "eda-samples", "cost", "confusion-champion",
                     "explain-champion", "confusion-ensemble", "curves-all-models",
                     *(f"curves-{n}" for n in experiment.names.values())):
        assert f"figures/{expected}.png" in names, expected
    # evaluate's Grad-CAM overview comes right after the champion's confusion matrix.
    assert refs.index("figures/explain-champion.png") == \
        refs.index("figures/confusion-champion.png") + 1
    table = md.split("## Models compared")[1].split("## Training curves")[0]
    for name in [*experiment.names.values(), experiment.ensemble_name]:
        assert f"| {name} |" in table, name
    assert "@champion" in table and "n_images" in md

    parsed = _parse(out.html)
    assert {"table", "tr", "td", "img"} <= set(parsed.tags)
    assert len(parsed.images) == len(refs)
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "@champion" in out.html.read_text()

    # Logged as artifacts: no pipeline run in this experiment, so a report-vN run.
    run = tracking.get_run(out.run_id)
    assert run.data.tags["cnnflow.step"] == "report" and run.info.status == "FINISHED"
    assert re.fullmatch(r"report-v\d+", run.info.run_name)
    logged = {f.path for f in tracking.list_artifacts(out.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures"} <= logged


def test_report_of_a_pipeline_run_covers_its_steps_and_logs_into_it(experiment, tracking,
                                                                     tmp_path):
    exp = tracking.get_experiment_by_name(EXPERIMENT)
    pipeline = tracking.create_run(exp.experiment_id, run_name="pipeline-v1",
                                   tags={"cnnflow.step": "pipeline",
                                         "cnnflow.selection_metric": "val_f1_macro",
                                         "cnnflow.judgement_metric": "test_f1_macro"}
                                   ).info.run_id
    only = experiment.runs["lenet5"]
    steps = [{"step": "eda", "name": "eda", "run_id": experiment.eda, "reused": True},
             {"step": "train", "name": "lenet5", "run_id": only, "reused": False}]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "steps.json").write_text(json.dumps(steps))
        tracking.log_artifact(pipeline, str(Path(tmp) / "steps.json"), "pipeline")
    try:
        out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="false",
                           pipeline_run_id=pipeline, **quiet)
        assert out.run_id == pipeline
        md = out.markdown.read_text()
        assert pipeline in md and f"| {experiment.names['lenet5']} |" in md
        assert f"| {experiment.names['custom_cnn']} |" not in md
        assert "No ensemble run" in md
        assert ("Candidate chosen by val_f1_macro (validation split); promotion judged on "
                "test_f1_macro (test split).") in md
        assert "curves-all-models" not in md  # one model: its own curves say it all
        logged = {f.path for f in tracking.list_artifacts(pipeline, "report")}
        assert {"report/report.md", "report/report.html"} <= logged
        with pytest.raises(ReportError, match="is not a pipeline run"):
            build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path / "x",
                         pipeline_run_id=only, pdf="false", **quiet)
        with pytest.raises(ReportError, match="not found"):
            build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path / "x",
                         pipeline_run_id="0" * 32, pdf="false", **quiet)
        assert not (tmp_path / "x").exists()
    finally:
        tracking.delete_run(pipeline)  # later reports of the experiment get their own run


def test_unknown_experiment_is_one_line_and_writes_nothing(experiment, tracking, tmp_path):
    reports = tmp_path / "reports"
    result = CliRunner().invoke(cli, ["report", "--experiment", "nope", "--reports-dir",
                                      str(reports)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: experiment 'nope' does not exist: pass the name cnnflow train used "
        "(the dataset's name by default)"]
    assert not reports.exists()


def test_experiment_without_training_runs_is_an_error(experiment, tracking, tmp_path):
    tracking.create_experiment("report-empty")
    with pytest.raises(ReportError, match="no finished training runs"):
        build_report(experiment.uri, "report-empty", reports_dir=tmp_path, **quiet)
    with pytest.raises(ReportError, match="pdf must be one of auto, true, false"):
        build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="maybe", **quiet)
    assert list(tmp_path.iterdir()) == []


def test_pdf_true_without_a_converter_fails_before_writing(experiment, tracking, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv(PDF_ENV, str(tmp_path / "no-such-converter"))
    assert find_pdf_converter() is None
    result = CliRunner().invoke(cli, ["report", "--experiment", EXPERIMENT, "--reports-dir",
                                      str(tmp_path / "r"), "--pdf", "true"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert PDF_ENV in result.output and "--pdf false" in result.output
    assert not (tmp_path / "r").exists()
    # auto: the report without the PDF, and the CLI says why.
    result = CliRunner().invoke(cli, ["report", "--experiment", EXPERIMENT, "--reports-dir",
                                      str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "no PDF:" in result.output and (tmp_path / "r" / EXPERIMENT / "report.html").is_file()
    assert not (tmp_path / "r" / EXPERIMENT / "report.pdf").exists()


@pytest.mark.skipif(find_pdf_converter() is None, reason="no chromium / wkhtmltopdf here")
def test_pdf_auto_prints_the_html_to_pdf(experiment, tracking, tmp_path):
    out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="auto", **quiet)
    assert out.pdf == out.folder / "report.pdf"
    assert out.pdf.read_bytes().startswith(b"%PDF")
    assert "report/report.pdf" in {f.path for f in tracking.list_artifacts(out.run_id,
                                                                           "report")}
