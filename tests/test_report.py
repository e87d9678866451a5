"""`cnnflow report`: the experiment's document, built from real runs on a real server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import SCREENSHOTS, launch_chromium, make_image_folder, playwright_or_skip
from mlflow import MlflowClient

from components import humanize
from components.steps.report import (
    COST_COLUMNS,
    MAIN_COLUMNS,
    PARITY_COLUMNS,
    PDF_ENV,
    Report,
    ReportError,
    Section,
    build_report,
    find_pdf_converter,
    make_table,
    render_html,
)
from components.tracking import registry
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
        evaluate(EvalParams(run_id=ens.run_id, latency_runs=2, num_workers=0, device="cpu"),
                 mlflow_server, **quiet)  # registered (maybe promoted) like a model
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


def _champion(client: MlflowClient):
    return client.get_model_version_by_alias(registry.default_name(EXPERIMENT),
                                             registry.CHAMPION)


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
    assert "best val loss" in tuning and "| learning rate |" in tuning
    assert "figures/tune-" in tuning
    refs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert refs and all((out.folder / r).is_file() for r in refs)
    assert {p.name for p in out.figures} == {Path(r).name for r in refs}
    names = " ".join(refs)
    champion = _champion(tracking)
    for expected in ("eda-class_counts", "eda-samples", "cost", "confusion-champion",
                     "explain-champion", "curves-all-models",
                     *(f"curves-{n}" for n in experiment.names.values())):
        assert f"figures/{expected}.png" in names, expected
    # The ensemble's own matrix only when it is not the champion (shown once).
    assert ("figures/confusion-ensemble.png" in names) == (champion.run_id != experiment.ensemble)
    # evaluate's Grad-CAM overview comes right after the champion's confusion matrix.
    assert refs.index("figures/explain-champion.png") == \
        refs.index("figures/confusion-champion.png") + 1
    table = md.split("## Models compared")[1].split("## Training curves")[0]
    header = "| " + " | ".join(humanize.label(c) for c in MAIN_COLUMNS) + " |"
    assert table.count(header) == 1  # the main table, its columns in the report's order
    main = table.split(header)[1].split("\n\n")[0]
    for model, run_id in [*experiment.runs.items(), ("ensemble", experiment.ensemble)]:
        run = tracking.get_run(run_id)
        row = next(li for li in main.splitlines() if li.startswith(f"| {run.info.run_name} |"))
        m = run.data.metrics
        # Numbers as people read them: accuracy in %, latency in ms, parameters in k/M.
        assert f"| {m['test_acc'] * 100:.1f} % |" in row, (model, row)
        assert re.search(r"\| [\d.,]+ ms \|", row), (model, row)
        assert re.search(r"\| [\d.]+ [kM] \| ", row) or model == "ensemble", (model, row)
    assert "@champion" in main and f"{registry.default_name(EXPERIMENT)} v" not in main
    assert "| images |" in md and "n_images" not in md
    # A hyperparameter every model shares is said once, in a sentence, not as a column.
    assert "batch size 8" in table and "| batch size |" not in table

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
        # The pipeline run once, by name and short id (its full id only in the link's URL).
        visible = re.sub(r"\]\([^)]*\)", "]", md)
        assert visible.count("pipeline-v1") == 1 and visible.count(pipeline[:8]) == 1
        models = md.split("## Models compared")[1].split("## Training curves")[0]
        assert pipeline not in visible and f"| {experiment.names['lenet5']} |" in models
        assert f"| {experiment.names['custom_cnn']} |" not in models
        assert "No ensemble run" in md
        assert ("Candidate chosen by val F1 (macro) (validation split); promotion judged on "
                "test F1 (macro) (test split).") in md
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


def test_an_ensemble_champion_has_one_confusion_matrix_section(experiment, tracking, tmp_path):
    name = registry.default_name(EXPERIMENT)
    before = _champion(tracking)
    ensemble = next(v for v in tracking.search_model_versions(f"name = '{name}'")
                    if v.run_id == experiment.ensemble)
    tracking.set_registered_model_alias(name, registry.CHAMPION, ensemble.version)
    try:
        out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="false",
                           **quiet)
    finally:
        tracking.set_registered_model_alias(name, registry.CHAMPION, before.version)
    md = out.markdown.read_text()
    section = md.split("## Confusion matrices")[1].split("\n## ")[0]
    assert section.count("### ") == 1
    assert f"### Champion: {experiment.ensemble_name} ({name} v{ensemble.version})" in section
    assert section.count("](figures/confusion-") == 1
    assert not (out.folder / "figures" / "confusion-ensemble.png").exists()


PDFTOTEXT = shutil.which("pdftotext")


@pytest.mark.skipif(find_pdf_converter() is None or "wkhtmltopdf" in str(find_pdf_converter()),
                    reason="no chromium here (make test installs it with root + apt)")
@pytest.mark.skipif(PDFTOTEXT is None,
                    reason="no pdftotext (poppler-utils; make test installs it with root + apt)")
def test_the_pdf_has_every_comparison_column_and_no_browser_footer(experiment, tracking,
                                                                     tmp_path):
    out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path, pdf="true", **quiet)
    assert out.pdf is not None and out.pdf.read_bytes().startswith(b"%PDF")
    words = subprocess.run([PDFTOTEXT, "-raw", str(out.pdf), "-"], capture_output=True,
                           text=True, check=True).stdout
    flat = " ".join(words.split())
    for column in MAIN_COLUMNS:
        assert humanize.label(column) in flat, column
    for name in [*experiment.names.values(), experiment.ensemble_name]:
        assert name in flat, name
    # No browser header/footer: no URL of the temporary build folder, no date/title line.
    assert "file://" not in flat and "-tmp-" not in flat and str(tmp_path) not in flat
    assert "cnnflow experiment report" not in flat.lower()


def _widths(page, html: Path) -> dict[str, int]:
    page.goto(html.resolve().as_uri())
    return page.evaluate("""() => ({
        page: document.documentElement.scrollWidth,
        table: Math.max(...[...document.querySelectorAll('table')].map(
            t => Math.ceil(t.getBoundingClientRect().right))),
        scrolled: [...document.querySelectorAll('.table')].filter(
            d => d.scrollWidth > d.clientWidth + 1).length})""")


def test_the_widest_table_fits_a_1280px_window(experiment, tmp_path):
    """The report as built, and the widest tables a report can hold (every comparison and
    cost column filled at realistic sizes): no table wider than the window, no page scroll."""
    sync_playwright = playwright_or_skip()
    out = build_report(experiment.uri, EXPERIMENT, reports_dir=tmp_path / "r", pdf="false",
                       **quiet)
    row = {"run": "resnet18_transfer-v12", "model": "resnet18_transfer", "format": "int8",
           "registry": "big-experiment-classifier v13 @champion; big-experiment-classifier v14",
           "best_val_acc": 0.98765, "test_acc": 0.97654, "test_f1_macro": 0.97432,
           "latency_ms_p50": 46.3659, "latency_ms_p95": 123.456, "model_size_mb": 44.7891,
           "params_count": 11_689_512, "epochs_run": 100, "test_acc_delta": -0.0123,
           "throughput_images_per_sec": 5177.7143, "latency_speedup": 2.3456,
           "max_abs_prob_diff": 1.234e-6, "top1_agreement": 0.9987,
           "gate": "rejected: test accuracy dropped by 1.2 points, more than --max-drop 1.0"}
    wide = Section("Widest tables")
    for columns in (list(MAIN_COLUMNS), COST_COLUMNS, PARITY_COLUMNS):
        wide.tables.append(make_table([row] * 3, columns))
    (tmp_path / "wide" / "figures").mkdir(parents=True)
    (tmp_path / "wide" / "report.html").write_text(render_html(Report("wide", [], [wide]),
                                                               tmp_path / "wide"))
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for html in (out.html, tmp_path / "wide" / "report.html"):
                widths = _widths(page, html)
                assert widths["page"] <= 1280 and widths["table"] <= 1280, (html, widths)
                assert widths["scrolled"] == 0, (html, widths)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.goto(out.html.resolve().as_uri())
            page.screenshot(path=str(SCREENSHOTS / "report-1280.png"), full_page=True)
        finally:
            browser.close()
