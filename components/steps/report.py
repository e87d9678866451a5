"""`report`: one document per experiment - data, models side by side, cost, registry.

Everything comes from MLflow (the runs a pipeline run lists in `pipeline/steps.json`, or the
experiment's latest finished runs), so the report can be rebuilt at any time from the server
alone. The runs become one data model (`Report`: sections holding text, tables, figures),
every number and label formatted by `components.humanize`; two Jinja2 templates render it,
`templates/report.md.j2` as Markdown with PNG figures (reads on GitHub and as run artifacts)
and `templates/report.html.j2` as one self-contained HTML file (figures as data URIs, print
CSS), which headless Chromium (or wkhtmltopdf) prints to PDF without browser header/footer.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components import humanize, plots, tracking
from components.errors import CnnflowError
from components.files import building, read_csv, slug
from components.names import (
    BEST_PARAM_TAG_PREFIX,
    BEST_TRIAL_TAG,
    CV_PARENT_TAG,
    DATASET_TAG,
    EXPLAIN_OVERVIEW_TAG,
    FOLD_TAG,
    MODEL_TAG,
    RETRAINED_RUN_TAG,
    STEP_TAG,
    TRIAL_TAG,
)
from components.steps import label_issues
from components.steps.templating import render
from components.tracking import comparison, registry

PDF_CHOICES = ("auto", "true", "false")
PDF_ENV = "CNNFLOW_PDF_CONVERTER"  # a converter command to use instead of the search below
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_PATHS = ("/usr/bin/chromium",)
PDF_TIMEOUT_S = 60
HTML_TEMPLATE, MARKDOWN_TEMPLATE = "report.html.j2", "report.md.j2"
EDA_METRICS = ("n_images", "n_classes", "imbalance_ratio", "n_corrupt", "n_duplicates",
               "n_cross_split_duplicates", "n_near_duplicate_groups", "n_near_dup_cross_split",
               "n_near_dup_label_conflicts", "n_distinct_sizes")
EDA_FIGURES = {"class_counts.png": "images per class and split",
               "near_duplicates.png": "the worst near-duplicate groups",
               "samples.png": "sample images per class"}
# The comparison, report column -> comparison.compare_runs column: the main table (what
# decides between models, fits a portrait page), then the details table (empty columns left
# out), then the hyperparameters that differ between the models.
MAIN_COLUMNS = {"run": "run", "registry": "registry", "best_val_acc": "val_acc",
                "test_acc": "test_acc", "test_f1_macro": "test_f1_macro",
                "latency_ms_p50": "latency_ms_p50", "model_size_mb": "model_size_mb",
                "params_count": "params_count", "epochs_run": "epochs_run"}
DETAIL_COLUMNS = ("run", "run_id", "test_loss", "test_top5_acc", "test_ece", "latency_ms_p95",
                  "throughput_images_per_sec", "peak_memory_mb")
HYPERPARAMETERS = ("lr", "batch_size", "epochs", "image_size", "dropout", "optimizer",
                   "weights", "freeze", "augmentation", "vote")
# The cost section's tables: each model's row, then its newest export's (PyTorch, each
# format); the parity table holds the exported formats only.
COST_COLUMNS = ("model", "format", "run", "test_acc", "test_acc_delta", "model_size_mb",
                "latency_ms_p50", "latency_ms_p95", "throughput_images_per_sec",
                "latency_speedup")
PARITY_COLUMNS = ("model", "format", "run", "max_abs_prob_diff", "top1_agreement", "gate",
                  "registry")
WIDE_TABLE = 9  # tables with more columns print on a landscape page
SMALL_TABLE = 15  # tables with at most this many rows are never split across pages
SHORT_ID = 8
CONFUSION = "evaluation/test/confusion_matrix.png"
LABEL_ISSUE_ROWS = 10  # the first rows of label_issues.csv the report lists
PIPELINE_STEPS = "pipeline/steps.json"


class ReportError(CnnflowError, RuntimeError):
    """A report that cannot be built; one line saying what to do."""


@dataclass
class ReportOutcome:
    folder: Path  # reports/<experiment>/
    markdown: Path  # report.md
    html: Path  # report.html (self-contained)
    pdf: Path | None  # report.pdf, or None (no converter, or pdf="false")
    run_id: str  # the run the report was logged into (artifact path "report/")
    figures: list[Path]  # PNG files under folder/figures/
    pdf_note: str = ""  # why there is no PDF


@dataclass
class Selection:
    """The runs a report covers."""

    experiment_id: str
    pipeline: Run | None
    eda: Run | None
    train: list[Run]
    ensemble: Run | None
    tune: list[Run] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Choosing the runs
# --------------------------------------------------------------------------------------------


def check_pdf(pdf: str) -> str:
    """auto | true | false, checked before anything is read or written."""
    value = str(pdf).strip().lower()
    if value not in PDF_CHOICES:
        raise ReportError(f"pdf must be one of {', '.join(PDF_CHOICES)} (got '{pdf}')")
    return value


def _search(client: MlflowClient, exp_id: str, step: str, finished: bool = True) -> list[Run]:
    """The experiment's runs of one step, newest first."""
    query = f"tags.`{STEP_TAG}` = '{step}'"
    if finished:
        query += " and attributes.status = 'FINISHED'"
    return client.search_runs([exp_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=50000, order_by=["attributes.start_time DESC"])


def _get_run(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def pipeline_run(client: MlflowClient, run_id: str, exp_id: str, experiment: str) -> Run:
    """The pipeline run `run_id`, checked to be one, and of this experiment."""
    run = _get_run(client, run_id)
    if run is None:
        raise ReportError(f"pipeline run '{run_id}' not found on this tracking server: pass the "
                          "run id cnnflow pipeline printed, or leave --pipeline-run out")
    if run.data.tags.get(STEP_TAG) != "pipeline":
        raise ReportError(f"run '{run_id}' is not a pipeline run (cnnflow.step="
                          f"{run.data.tags.get(STEP_TAG, 'none')}): pass a pipeline "
                          "run's id, or leave --pipeline-run out")
    if run.info.experiment_id != exp_id:
        raise ReportError(f"pipeline run '{run_id}' belongs to another experiment than "
                          f"'{experiment}': pass its own --experiment")
    return run


def pipeline_steps(client: MlflowClient, run: Run) -> list[dict[str, Any]]:
    """The steps a pipeline run recorded (`pipeline/steps.json`)."""
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        try:
            local = client.download_artifacts(run.info.run_id, PIPELINE_STEPS, tmp)
            steps = json.loads(Path(local).read_text())
        except (MlflowException, OSError, ValueError):
            raise ReportError(f"pipeline run '{run.info.run_id}' has no readable "
                              f"{PIPELINE_STEPS}: rerun the pipeline, or leave --pipeline-run "
                              "out") from None
    if not isinstance(steps, list):
        raise ReportError(f"{PIPELINE_STEPS} of run '{run.info.run_id}' is not a list of steps")
    return [s for s in steps if isinstance(s, dict)]


def select_runs(client: MlflowClient, exp_id: str, experiment: str,
                pipeline: Run | None = None) -> Selection:
    """The eda, train and ensemble runs of a pipeline run, or the experiment's latest ones."""
    if pipeline is not None:
        steps = pipeline_steps(client, pipeline)

        def runs_of(step: str) -> list[Run]:
            found = [_get_run(client, str(s.get("run_id", ""))) for s in steps
                     if s.get("step") == step and s.get("run_id")]
            return [r for r in found if r is not None]

        eda, ensemble = runs_of("eda"), runs_of("ensemble")
        train = runs_of("train")
        selection = Selection(exp_id, pipeline, eda[-1] if eda else None, train,
                              ensemble[-1] if ensemble else None)
    else:
        eda = _search(client, exp_id, "eda")
        ensemble = _search(client, exp_id, "ensemble")
        parents: dict[str, str] = {}
        newest: dict[str, Run] = {}  # model -> its latest finished run
        for run in _search(client, exp_id, "train"):
            model = run.data.tags.get(MODEL_TAG, run.info.run_id)
            if model not in newest and _top_level(client, run, parents):
                newest[model] = run
        train = list(reversed(newest.values()))
        selection = Selection(exp_id, None, eda[0] if eda else None, train,
                              ensemble[0] if ensemble else None)
    if not selection.train:
        where = (f"pipeline run '{pipeline.info.run_id}' lists" if pipeline is not None
                 else f"experiment '{experiment}' has")
        raise ReportError(f"{where} no finished training runs: train a model first "
                          f"(cnnflow train --experiment {experiment})")
    selection.tune = _search(client, exp_id, "tune")
    return selection


def _top_level(client: MlflowClient, run: Run, parents: dict[str, str]) -> bool:
    """A model of its own: not a fold, a trial or a bagging member (a pipeline may parent it).

    `parents` caches parent run id -> its step, so siblings cost one lookup.
    """
    tags = run.data.tags
    if FOLD_TAG in tags or TRIAL_TAG in tags:
        return False
    parent = tags.get(MLFLOW_PARENT_RUN_ID)
    if not parent:
        return True
    if parent not in parents:
        found = _get_run(client, parent)
        parents[parent] = found.data.tags.get(STEP_TAG, "") if found else ""
    return parents[parent] == "pipeline"


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------


def find_pdf_converter() -> str | None:
    """The converter command: $CNNFLOW_PDF_CONVERTER when set (no fallback), else chromium
    (PATH, then fixed paths), else wkhtmltopdf; None when there is none."""
    forced = os.environ.get(PDF_ENV, "").strip()
    if forced:
        return shutil.which(forced)
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    for path in CHROMIUM_PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("wkhtmltopdf")


def _no_converter_reason() -> str:
    forced = os.environ.get(PDF_ENV, "").strip()
    if forced:
        return (f"{PDF_ENV}={forced} is not an executable command: point it at chromium or "
                "wkhtmltopdf, unset it, or pass --pdf false")
    return (f"no PDF converter found ({', '.join(CHROMIUM_NAMES + CHROMIUM_PATHS)}, "
            "wkhtmltopdf): install chromium or wkhtmltopdf, or pass --pdf false")


def pdf_command(converter: str, source: Path, target: Path, profile: str) -> list[str]:
    """The converter's command line. Chromium prints with the page size and margins of the
    HTML's `@page` rules and without its own header/footer (date, title, the file's URL:
    the report is built in a temporary folder, whose path must not end up on every page);
    both spellings of that flag, as Chromium renamed it (unknown flags are ignored)."""
    if "wkhtmltopdf" in Path(converter).name:  # prints no header/footer unless asked to
        return [converter, "--quiet", "--enable-local-file-access", "--print-media-type",
                str(source), str(target)]
    return [converter, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update",
            "--no-pdf-header-footer", "--print-to-pdf-no-header",
            "--generate-pdf-document-outline", f"--user-data-dir={profile}",
            f"--print-to-pdf={target}", source.resolve().as_uri()]


def html_to_pdf(converter: str, source: Path, target: Path) -> None:
    """Print `source` to `target` with headless chromium or wkhtmltopdf (60 s at most)."""
    with tempfile.TemporaryDirectory(prefix="cnnflow-pdf-") as profile:
        cmd = pdf_command(converter, source, target, profile)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PDF_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{converter} did not print the PDF within {PDF_TIMEOUT_S} s: "
                              "pass --pdf false") from None
        except OSError as exc:
            raise ReportError(f"cannot run {converter} ({exc}): pass --pdf false") from None
    if not target.is_file() or not target.read_bytes().startswith(b"%PDF"):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise ReportError(f"{converter} wrote no PDF ({tail[0][:200]}): pass --pdf false")


# --------------------------------------------------------------------------------------------
# The data model: what the report says, rendered by both templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A piece of running text: plain, `code`, or a link (`href`)."""

    text: str
    code: bool = False
    href: str = ""


Text = list[Span]


def text(*parts: str | Span) -> Text:
    """A sentence from plain strings and `code()` / `link()` spans."""
    return [p if isinstance(p, Span) else Span(p) for p in parts if p != ""]


def code(value: Any) -> Span:
    return Span(str(value), code=True)


def link(label: str, href: str) -> Span:
    return Span(label, href=href)


@dataclass
class Table:
    """Formatted cells under human headers; `numeric` columns align right."""

    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    caption: str = ""

    @property
    def wide(self) -> bool:
        """Prints on a landscape page."""
        return len(self.headers) > WIDE_TABLE

    @property
    def small(self) -> bool:
        """Kept on one page."""
        return len(self.rows) <= SMALL_TABLE


@dataclass
class Figure:
    name: str  # figures/<name>
    caption: str
    data_uri: str = ""  # filled for the self-contained HTML


@dataclass
class Section:
    """A heading and what follows it, in this order: text, tables, notes on the tables, a
    titled list, figures, then subsections."""

    title: str
    level: int = 2
    paragraphs: list[Text] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[Text] = field(default_factory=list)
    items: list[Text] = field(default_factory=list)
    items_title: str = ""
    figures: list[Figure] = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)

    def para(self, *parts: str | Span) -> None:
        self.paragraphs.append(text(*parts))

    def sub(self, title: str) -> Section:
        section = Section(title, level=self.level + 1)
        self.subsections.append(section)
        return section


@dataclass
class Report:
    title: str
    facts: list[Text]
    sections: list[Section]

    def all_figures(self) -> list[Figure]:
        found: list[Figure] = []

        def walk(section: Section) -> None:
            found.extend(section.figures)
            for sub in section.subsections:
                walk(sub)

        for section in self.sections:
            walk(section)
        return found


def cell(value: Any, column: str, model_name: str = "") -> str:
    """One table cell for people: humanize's number format by column, short run ids, registry
    versions of the experiment's model without its (stated once) name."""
    if value is None or value == "":
        return ""
    if column == "run_id":
        return str(value)[:SHORT_ID]
    if column == "registry" and model_name:
        return "; ".join(v.removeprefix(f"{model_name} ") for v in str(value).split("; "))
    if column == "aliases":
        return ", ".join(f"@{a}" for a in str(value).split(",") if a)
    return humanize.number(value, column)


def make_table(rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...], *,
               caption: str = "", model_name: str = "",
               labels: dict[str, str] | None = None) -> Table:
    """`rows` under `columns`, every header `humanize.label`led (or `labels[column]`)."""
    labels = labels or {}
    numeric = [any(_is_number(r.get(c)) for r in rows)
               and all(_is_number(r.get(c)) for r in rows if r.get(c) not in (None, ""))
               for c in columns]
    return Table([labels.get(c) or humanize.label(c) for c in columns],
                 [[cell(r.get(c), c, model_name) for c in columns] for r in rows],
                 numeric, caption)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _filled(rows: list[dict[str, Any]], columns: tuple[str, ...], keep: int = 1) -> list[str]:
    """`columns` without those no row has a value for (the first `keep` always stay)."""
    return [c for i, c in enumerate(columns)
            if i < keep or any(r.get(c) not in (None, "") for r in rows)]


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------


def _fetch(client: MlflowClient, run_id: str, artifact: str, target: Path) -> Path | None:
    """Download one artifact to `target`, or None when the run does not have it."""
    parent = artifact.rsplit("/", 1)[0] if "/" in artifact else None
    try:
        if artifact not in {f.path for f in client.list_artifacts(run_id, parent)}:
            return None
        with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
            local = client.download_artifacts(run_id, artifact, tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(local, target)
    except (MlflowException, OSError):
        return None
    return target


class _Figures:
    """Unique names under figures/, and the downloads / plots that fill them."""

    def __init__(self, folder: Path, client: MlflowClient) -> None:
        self.dir = folder / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.used: set[str] = set()

    def name(self, stem: str) -> str:
        base = slug(stem)
        name, n = f"{base}.png", 1
        while name in self.used:
            n += 1
            name = f"{base}-{n}.png"
        self.used.add(name)
        return name

    def fetch(self, run_id: str, artifact: str, stem: str, caption: str) -> Figure | None:
        name = self.name(stem)
        if _fetch(self.client, run_id, artifact, self.dir / name):
            return Figure(name, caption)
        self.used.discard(name)
        return None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every section reads."""

    client: MlflowClient
    tracking_uri: str
    experiment: str
    sel: Selection
    figs: _Figures
    model_name: str  # the experiment's registered model

    def run_ref(self, run: Run | None, run_id: str = "", name: str = "") -> list[Span]:
        """A run once: its name (a link to its MLflow page when there is a UI) and short id."""
        run_id = run.info.run_id if run is not None else run_id
        name = _name(run) if run is not None else name or run_id[:SHORT_ID]
        url = tracking.run_url(self.tracking_uri, self.sel.experiment_id, run_id)
        named = link(name, url) if tracking.has_ui(self.tracking_uri) else code(name)
        return [named, Span(" ("), code(run_id[:SHORT_ID]), Span(")")]


def _name(run: Run) -> str:
    return run.info.run_name or run.info.run_id


def _facts(ctx: _Context, run_id: str, run_name: str) -> list[Text]:
    """The header: when, which experiment, which runs, where the report is logged."""
    sel = ctx.sel
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    url = tracking.experiment_url(ctx.tracking_uri, sel.experiment_id)
    where = (link(url, url) if tracking.has_ui(ctx.tracking_uri) else code(url))
    facts = [text(f"Generated {when} by ", code("cnnflow report"), "."),
             text("MLflow experiment ", code(ctx.experiment), f" (id {sel.experiment_id}): ",
                  where, ".")]
    if sel.pipeline is not None:
        facts.append(text("The runs of pipeline run ", *ctx.run_ref(sel.pipeline),
                          "; this report is logged into it under ", code("report/"), "."))
        tags = sel.pipeline.data.tags
        if registry.SELECTION_METRIC_TAG in tags and registry.JUDGEMENT_METRIC_TAG in tags:
            chosen, judged = (tags[registry.SELECTION_METRIC_TAG],
                              tags[registry.JUDGEMENT_METRIC_TAG])
            facts.append(text(f"Candidate chosen by {humanize.label(chosen)} "
                              f"({registry.metric_split(chosen)}); promotion judged on "
                              f"{humanize.label(judged)} ({registry.metric_split(judged)})."))
    else:
        facts.append(text("The latest finished run of each model (no pipeline run given); "
                          "this report is logged into run ",
                          *ctx.run_ref(None, run_id, run_name),
                          " under ", code("report/"), "."))
    return facts


def _eda_section(ctx: _Context) -> Section:
    section = Section("Dataset")
    run = ctx.sel.eda
    if run is None:
        section.para("No finished eda run in this experiment: run ", code("cnnflow eda"),
                     " for a dataset summary.")
    else:
        dataset = run.data.tags.get(DATASET_TAG, "")
        section.para("From eda run ", *ctx.run_ref(run),
                     *((", dataset ", code(dataset), ".") if dataset else (".",)))
        metrics = run.data.metrics
        rows = [{"name": humanize.label(k), "value": humanize.number(metrics[k], k)}
                for k in EDA_METRICS if k in metrics]
        if rows:
            section.tables.append(Table(["", "value"], [[r["name"], r["value"]] for r in rows],
                                        [False, True]))
        section.items = [text(f) for f in _eda_findings(ctx.client, run.info.run_id)]
        section.items_title = "Findings" if section.items else ""
        for artifact, caption in EDA_FIGURES.items():
            if figure := ctx.figs.fetch(run.info.run_id, f"report/{artifact}",
                                        f"eda-{artifact[:-4]}", caption):
                section.figures.append(figure)
    section.subsections.append(_label_issues_section(ctx))
    return section


def _label_issues_section(ctx: _Context) -> Section:
    """The latest `label-issues` run of the experiment: how many, the first few, its grid."""
    section = Section("Label issues", level=3)
    found = _search(ctx.client, ctx.sel.experiment_id, label_issues.STEP)
    if not found:
        section.para("No label-issues run in this experiment: ",
                     code("cnnflow train --cv 5 --find-label-issues true"),
                     " ranks likely mislabelled images for review.")
        return section
    run = found[0]
    metrics = run.data.metrics
    count = int(metrics.get("n_label_issues", 0))
    url = tracking.run_url(ctx.tracking_uri, ctx.sel.experiment_id, run.info.run_id)
    section.para("Run ", link(_name(run), url),
                 f" flags {humanize.plural(count, 'likely mislabelled image')} out of "
                 f"{humanize.number(metrics.get('n_images', 0), 'n_images')} "
                 "(cross-validation run ", code(run.data.tags.get(CV_PARENT_TAG, "?")[:SHORT_ID]),
                 "); nothing was changed. Review ", code("label_issues.csv"),
                 ", then leave the confirmed ones out with ",
                 code("cnnflow train --exclude-file"), ".")
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        local = _fetch(ctx.client, run.info.run_id,
                       f"{label_issues.ARTIFACT_DIR}/{label_issues.FILES['issues']}",
                       Path(tmp) / "issues.csv")
        rows = read_csv(local)[:LABEL_ISSUE_ROWS] if local else []
    if rows:
        section.tables.append(make_table(rows, ["path", "given_label", "suggested_label",
                                                "quality_score"],
                                         caption=f"The first {len(rows)}, least likely label "
                                                 "first"))
    if figure := ctx.figs.fetch(run.info.run_id,
                                f"{label_issues.ARTIFACT_DIR}/{label_issues.FILES['grid']}",
                                "label-issues",
                                "likely mislabelled images: given -> suggested label"):
        section.figures.append(figure)
    return section


def _eda_findings(client: MlflowClient, run_id: str) -> list[str]:
    """The bullet list under `## Findings` in the eda run's report.md."""
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        local = _fetch(client, run_id, "report/report.md", Path(tmp) / "report.md")
        if local is None:
            return []
        lines = local.read_text(errors="replace").splitlines()
    found, inside = [], False
    for line in lines:
        if line.startswith("## "):
            inside = line.strip() == "## Findings"
        elif inside and line.startswith("- "):
            found.append(line[2:].strip())
    return found


def _comparison_rows(ctx: _Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """compare_runs' rows of the selected runs (train runs in order, the ensemble last), and
    the cost rows: each of those runs (format `pytorch`) followed by the rows of its newest
    finished export run, the PyTorch reference and each format (none when never exported)."""
    sel = ctx.sel
    order = [r.info.run_id for r in sel.train]
    if sel.ensemble is not None:
        order.append(sel.ensemble.info.run_id)
    compared = comparison.compare_runs(ctx.client, ctx.experiment)
    by_id = {r["run_id"]: r for r in compared if not r.get(comparison.SOURCE_RUN_ID)}
    newest: dict[str, str] = {}  # source run id -> its newest export run id
    formats: dict[str, list[dict[str, Any]]] = {}
    for row in compared:  # a source's export rows come newest first
        source = row.get(comparison.SOURCE_RUN_ID)
        if source and newest.setdefault(source, row["run_id"]) == row["run_id"]:
            formats.setdefault(source, []).append(row)
    ids = [rid for rid in order if rid in by_id]
    rows = [{**by_id[rid], **{ours: by_id[rid].get(theirs)
                              for ours, theirs in MAIN_COLUMNS.items()}} for rid in ids]
    return rows, [r for rid in ids for r in (by_id[rid], *formats.get(rid, []))]


def _models_section(ctx: _Context, rows: list[dict[str, Any]]) -> Section:
    section = Section("Models compared")
    section.para("Validation accuracy is the best epoch's; test metrics and cost come from ",
                 code("cnnflow evaluate"), " (empty when a run was not evaluated). Registry: "
                 "the versions of ", code(ctx.model_name), " made from the run.")
    section.tables.append(make_table(rows, list(MAIN_COLUMNS), model_name=ctx.model_name))
    details = _filled(rows, DETAIL_COLUMNS)
    section.tables.append(make_table(rows, details, caption="More metrics"))
    shared, differ = [], []
    for column in HYPERPARAMETERS:
        values = {humanize.number(r.get(column), column) for r in rows} - {""}
        if len(values) == 1:
            shared.append(f"{humanize.label(column)} {values.pop()}")
        elif values:
            differ.append(column)
    if differ:
        section.tables.append(make_table(rows, ["run", *differ],
                                         caption="Hyperparameters that differ"))
    if shared:
        section.notes.append(text("Same for every model that has it: " + ", ".join(shared)
                                  + "."))
    return section


def _curves_section(ctx: _Context) -> Section:
    section = Section("Training curves")
    histories = {_name(r): h for r in ctx.sel.train
                 if (h := run_history(ctx.client, r.info.run_id))}
    if len(histories) > 1:
        name = ctx.figs.name("curves-all-models")
        plots.plot_curves_all(histories, ctx.figs.dir / name)
        section.figures.append(Figure(name, "training curves of every model "
                                            "(val solid, train dashed)"))
    for run in ctx.sel.train:
        figure = _curves(ctx.figs, run)
        if figure:
            section.sub(_name(run)).figures.append(figure)
        else:
            section.para(code(_name(run)), ": no training curves logged.")
    return section


def _cost_section(ctx: _Context, costs: list[dict[str, Any]]) -> Section:
    section = Section("Cost")
    costed = [{**r, "run": _cost_label(r, costs)} for r in costs
              if any(r.get(m) is not None for m, _ in plots.COST_METRICS)]
    if costed:
        name = ctx.figs.name("cost")
        plots.plot_cost(costed, ctx.figs.dir / name)
        section.figures.append(Figure(name, "latency p50, model size and parameters per "
                                            "model and format"))
    else:
        section.para("No cost metrics yet: ", code("cnnflow evaluate"),
                     " measures latency, size and parameters.")
    exported = [r for r in costs if r["format"] != comparison.REFERENCE_FORMAT]
    if exported:
        section.para("One row per format: the run as ", code("cnnflow evaluate"),
                     " measured it, then its newest ", code("cnnflow export"), ", which "
                     "measures the PyTorch model (", code("pytorch"), ") and each exported "
                     "format side by side on the same test images and threads, so compare "
                     "those rows with each other; speed-up is PyTorch's latency p50 over the "
                     "format's. A format that failed its gate is not registered.")
        section.tables.append(make_table(costs, _filled(costs, COST_COLUMNS, keep=3),
                                         caption="Cost per format"))
        section.tables.append(make_table(exported, PARITY_COLUMNS, model_name=ctx.model_name,
                                         caption="Exported formats against PyTorch"))
    return section


def _cost_label(row: dict[str, Any], costs: list[dict[str, Any]]) -> str:
    """A bar's name: the run, or the source run and the format for an export's row."""
    source = row.get(comparison.SOURCE_RUN_ID)
    if not source:
        return str(row["run"])
    return next((f"{r['run']}\n{row['format']}" for r in costs if r["run_id"] == source),
                f"{row['run']}\n{row['format']}")


HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc")


def run_history(client: MlflowClient, run_id: str) -> list[dict[str, float]]:
    """A training run's per-epoch history: its `history.json` (tracking.log_history), else
    rebuilt from the metric history; [] when it has neither (the pipeline's all-models figure
    and the report read it the same way)."""
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        if local := _fetch(client, run_id, "history.json", Path(tmp) / "history.json"):
            try:
                history = json.loads(local.read_text())
            except ValueError:
                history = []
    if not history:
        try:
            series = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
                      for k in HISTORY_KEYS}
        except MlflowException:
            return []
        steps = sorted(set.intersection(*(set(s) for s in series.values())))
        history = [{"epoch": s, **{k: series[k][s] for k in HISTORY_KEYS}} for s in steps]
    if not history or not all(k in history[0] for k in HISTORY_KEYS):
        return []
    return history


def _curves(figs: _Figures, run: Run) -> Figure | None:
    """figures/curves.png of the run; else drawn from its history."""
    caption = f"training curves of {_name(run)}"
    if figure := figs.fetch(run.info.run_id, "figures/curves.png", f"curves-{_name(run)}",
                            caption):
        return figure
    history = run_history(figs.client, run.info.run_id)
    if not history:
        return None
    name = figs.name(f"curves-{_name(run)}")
    plots.plot_curves(history, figs.dir / name)
    return Figure(name, caption)


def _confusion_section(ctx: _Context) -> Section:
    """The champion's confusion matrix and Grad-CAM overview, then the ensemble's - once,
    when the ensemble is the champion."""
    section = Section("Confusion matrices")
    champion = registry.get_alias(ctx.client, ctx.model_name, registry.CHAMPION)
    ensemble = ctx.sel.ensemble
    if champion is None or not champion.run_id:
        section.para("No champion: registered model ", code(ctx.model_name), " has no ",
                     code("@champion"), " yet (cnnflow evaluate registers and promotes).")
    else:
        run = _get_run(ctx.client, champion.run_id)
        label = _name(run) if run else champion.run_id[:SHORT_ID]
        is_ensemble = ensemble is not None and ensemble.info.run_id == champion.run_id
        title = f"Champion: {label} ({ctx.model_name} v{champion.version})"
        _model_figures(ctx, section.sub(title + (", the ensemble" if is_ensemble else "")),
                       run, champion.run_id, label, "champion")
        if is_ensemble:
            return section
    if ensemble is None:
        section.para("No ensemble run: ", code("cnnflow ensemble"),
                     " combines the trained models.")
        return section
    label = _name(ensemble)
    _model_figures(ctx, section.sub(f"Ensemble: {label}"), ensemble, ensemble.info.run_id,
                   label, "ensemble")
    return section


def _model_figures(ctx: _Context, section: Section, run: Run | None, run_id: str,
                   label: str, stem: str) -> None:
    """The run's confusion matrix, then evaluate's Grad-CAM overview of it (its
    `cnnflow.explain_overview` tag; none when evaluate drew none, --explain-images 0)."""
    if figure := ctx.figs.fetch(run_id, CONFUSION, f"confusion-{stem}",
                                f"confusion matrix of {label} on the test split"):
        section.figures.append(figure)
    else:
        section.para("Run ", code(label), " has no ", code(CONFUSION),
                     ": evaluate it on the test split.")
    artifact = run.data.tags.get(EXPLAIN_OVERVIEW_TAG) if run is not None else None
    split = artifact.split("/")[1] if artifact and artifact.count("/") > 1 else "evaluated"
    if artifact and (figure := ctx.figs.fetch(
            run_id, artifact, f"explain-{stem}",
            f"Grad-CAM of {label}'s highest-loss and confused {split} images (where the "
            "evidence for the predicted class sits)")):
        section.figures.append(figure)


def _tuning_section(ctx: _Context) -> Section | None:
    if not ctx.sel.tune:
        return None
    section = Section("Tuning")
    for run in ctx.sel.tune:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        sub = section.sub(_name(run))
        metric = params.get("metric", "objective")
        if "best_value" in metrics:
            trial = f" (trial {tags[BEST_TRIAL_TAG]})" if BEST_TRIAL_TAG in tags else ""
            sub.items.append(text(f"best {humanize.label(metric)}: "
                                  f"{humanize.number(metrics['best_value'], metric)}{trial}"))
        counts = [f"{metrics[k]:.0f} {k.split('_')[-1]}" for k in
                  ("n_trials_complete", "n_trials_pruned", "n_trials_failed") if k in metrics]
        if counts:
            sub.items.append(text("trials: " + ", ".join(counts)))
        if retrained := tags.get(RETRAINED_RUN_TAG):
            sub.items.append(text("best configuration retrained as run ",
                                  code(retrained[:SHORT_ID])))
        # Tags since tune workers share one parent run; `best_<param>` params before that.
        best = ([(k[len(BEST_PARAM_TAG_PREFIX):], v) for k, v in sorted(tags.items())
                 if k.startswith(BEST_PARAM_TAG_PREFIX)]
                or [(k[len("best_"):], v) for k, v in sorted(params.items())
                    if k.startswith("best_")])
        if best:
            sub.tables.append(Table(["parameter", "best value"],
                                    [[humanize.label(k), humanize.number(v, k)]
                                     for k, v in best], [False, False]))
        try:
            pngs = sorted(f.path for f in ctx.client.list_artifacts(run.info.run_id,
                                                                    "tune/figures")
                          if f.path.endswith(".png"))
        except MlflowException:
            pngs = []
        for artifact in pngs:
            stem = Path(artifact).stem
            if figure := ctx.figs.fetch(run.info.run_id, artifact, f"tune-{_name(run)}-{stem}",
                                        f"{stem.replace('_', ' ')} ({_name(run)})"):
                sub.figures.append(figure)
    return section


def _registry_section(ctx: _Context) -> Section:
    section = Section("Registry")
    rows = registry.version_summary(ctx.client, ctx.model_name)
    if not rows:
        section.para("Registered model ", code(ctx.model_name), " has no versions yet.")
        return section
    section.para("Registered model ", code(ctx.model_name), ", newest version first.")
    names: dict[str, str] = {}
    for row in rows:
        rid = row.get("run_id") or ""
        if rid and rid not in names:
            run = _get_run(ctx.client, rid)
            names[rid] = _name(run) if run else rid[:SHORT_ID]
        row["run"] = names.get(rid, "")
    section.tables.append(make_table(rows, ["version", "aliases", "run", "decision",
                                            "reason"]))
    return section


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def build_document(ctx: _Context, run_id: str, run_name: str) -> Report:
    """The report's data model: every section, figures already under figures/."""
    rows, costs = _comparison_rows(ctx)
    sections = [_eda_section(ctx), _models_section(ctx, rows), _curves_section(ctx),
                _cost_section(ctx, costs), _confusion_section(ctx), _tuning_section(ctx),
                _registry_section(ctx)]
    return Report(f"Experiment report: {ctx.experiment}", _facts(ctx, run_id, run_name),
                  [s for s in sections if s is not None])


def render_markdown(report: Report) -> str:
    """report.md: figures linked relatively (figures/<name>)."""
    return re.sub(r"\n{3,}", "\n\n", render(MARKDOWN_TEMPLATE, report=report))


def render_html(report: Report, folder: Path) -> str:
    """report.html: one self-contained file, every figure embedded as a data URI."""
    for figure in report.all_figures():
        data = base64.b64encode((folder / "figures" / figure.name).read_bytes())
        figure.data_uri = "data:image/png;base64," + data.decode("ascii")
    return render(HTML_TEMPLATE, report=report)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def build_report(tracking_uri: str, experiment: str, *, reports_dir: str | Path,
                 pipeline_run_id: str = "", pdf: str = "auto",
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 job_run_id: str | None = None) -> ReportOutcome:
    """Write `<reports_dir>/<experiment>/` (report.md, report.html, figures/, maybe report.pdf)
    in one step and log it under `report/` into the pipeline run (or a `report-vN` run: the
    job's run `job_run_id` when given, else a new one)."""
    pdf = check_pdf(pdf)
    client = tracking.connect(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise ReportError(f"experiment '{experiment}' does not exist: pass the name cnnflow "
                          "train used (the dataset's name by default)")
    exp_id = exp.experiment_id
    pipeline = (pipeline_run(client, pipeline_run_id.strip(), exp_id, experiment)
                if pipeline_run_id.strip() else None)
    sel = select_runs(client, exp_id, experiment, pipeline)
    converter = find_pdf_converter() if pdf != "false" else None
    pdf_note = "" if converter else ("--pdf false" if pdf == "false" else _no_converter_reason())
    if pdf == "true" and converter is None:
        raise ReportError(_no_converter_reason())

    folder = Path(reports_dir) / slug(experiment)
    if folder.name == "eda":  # eda's own reports live in reports/eda/<dataset>/
        raise ReportError(f"experiment '{experiment}' would replace {folder} (the eda "
                          "reports): pass another --reports-dir")
    args = (client, tracking_uri, experiment, sel, folder, converter, pdf, log)
    if pipeline is not None:
        outcome = _write(*args, pipeline.info.run_id, _name(pipeline))
    else:
        run_id, _, run_name = tracking.open_run(client, step="report", experiment=experiment,
                                                adopt=job_run_id)
        with tracking.ending_run(client, run_id):
            outcome = _write(*args, run_id, run_name)
    outcome.pdf_note = outcome.pdf_note or pdf_note
    if outcome.pdf is None and pdf == "auto" and converter is None:
        log(f"report: no PDF: {pdf_note}")
    log(f"report: {outcome.markdown} ({len(outcome.figures)} figures), logged into run "
        f"{outcome.run_id}")
    return outcome


def _write(client: MlflowClient, tracking_uri: str, experiment: str, sel: Selection,
           folder: Path, converter: str | None, pdf: str, log: Callable[[str], None],
           run_id: str, run_name: str) -> ReportOutcome:
    """Build in a sibling temp folder, log it, then swap it into place: all or nothing."""
    with building(folder) as tmp:
        ctx = _Context(client, tracking_uri, experiment, sel, _Figures(tmp, client),
                       registry.default_name(experiment))
        report = build_document(ctx, run_id, run_name)
        (tmp / "report.md").write_text(render_markdown(report))
        (tmp / "report.html").write_text(render_html(report, tmp))
        pdf_path, note = None, ""
        if converter is not None:
            try:
                html_to_pdf(converter, tmp / "report.html", tmp / "report.pdf")
                pdf_path = folder / "report.pdf"
            except ReportError as exc:
                if pdf == "true":
                    raise
                note = str(exc)
                log(f"report: no PDF: {note}")
                (tmp / "report.pdf").unlink(missing_ok=True)
        client.log_artifacts(run_id, str(tmp), artifact_path="report")
    figures = sorted((folder / "figures").glob("*.png"))
    return ReportOutcome(folder, folder / "report.md", folder / "report.html", pdf_path,
                         run_id, figures, note)
