"""`report`: one document per experiment - data, models side by side, cost, registry.

Everything comes from MLflow (the runs a pipeline run lists in `pipeline/steps.json`, or the
experiment's latest finished runs), so the report can be rebuilt at any time from the server
alone. It is written as Markdown with PNG figures (reads on GitHub and as run artifacts), as one
self-contained HTML file (figures embedded as data URIs, to mail or attach) and, when a headless
browser or wkhtmltopdf is installed, as PDF.
"""

from __future__ import annotations

import base64
import html
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

from components import plots, tracking
from components.errors import CnnflowError
from components.files import building, read_csv, slug
from components.names import (
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
from components.tracking import comparison, registry

PDF_CHOICES = ("auto", "true", "false")
PDF_ENV = "CNNFLOW_PDF_CONVERTER"  # a converter command to use instead of the search below
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_PATHS = ("/usr/bin/chromium",)
PDF_TIMEOUT_S = 60
EDA_METRICS = ("n_images", "n_classes", "imbalance_ratio", "n_corrupt", "n_duplicates",
               "n_cross_split_duplicates", "n_near_duplicate_groups", "n_near_dup_cross_split",
               "n_near_dup_label_conflicts", "n_distinct_sizes")
EDA_FIGURES = {"class_counts.png": "images per class and split",
               "near_duplicates.png": "the worst near-duplicate groups",
               "samples.png": "sample images per class"}
# Report column -> comparison.compare_runs column.
TABLE_COLUMNS = {"run": "run", "model": "model", "best_val_acc": "val_acc",
                 "test_acc": "test_acc", "test_f1_macro": "test_f1_macro",
                 "latency_ms_p50": "latency_ms_p50", "model_size_mb": "model_size_mb",
                 "params_count": "params_count",
                 "throughput_images_per_sec": "throughput_images_per_sec",
                 "epochs_run": "epochs_run", "registry": "registry"}
# The cost section's table: each model's row, then its newest export's (PyTorch, each format).
FORMAT_COLUMNS = ("model", "format", "run", "test_acc", "test_acc_delta", "model_size_mb",
                  "latency_ms_p50", "latency_ms_p95", "throughput_images_per_sec",
                  "latency_speedup", "max_abs_prob_diff", "top1_agreement", "gate", "registry")
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


def html_to_pdf(converter: str, source: Path, target: Path) -> None:
    """Print `source` to `target` with headless chromium or wkhtmltopdf (60 s at most)."""
    with tempfile.TemporaryDirectory(prefix="cnnflow-pdf-") as profile:
        if "wkhtmltopdf" in Path(converter).name:
            cmd = [converter, "--quiet", "--enable-local-file-access", str(source), str(target)]
        else:
            cmd = [converter, "--headless", "--no-sandbox", "--disable-gpu",
                   f"--user-data-dir={profile}", f"--print-to-pdf={target}",
                   source.resolve().as_uri()]
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
# The document: blocks rendered twice, as Markdown and as self-contained HTML
# --------------------------------------------------------------------------------------------


class Document:
    """Headings, paragraphs, lists, tables and figures, kept as blocks so the Markdown and the
    HTML say exactly the same thing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.blocks: list[tuple[Any, ...]] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        self.blocks.append(("table", rows, columns))

    def figure(self, name: str, alt: str) -> None:
        """`figures/<name>`, which must already exist."""
        assert (self.folder / "figures" / name).is_file(), name
        self.blocks.append(("img", name, alt))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, *args in self.blocks:
            if kind == "h":
                out += ["#" * args[0] + " " + args[1], ""]
            elif kind == "p":
                out += [args[0], ""]
            elif kind == "ul":
                out += [f"- {item}" for item in args[0]] + [""]
            elif kind == "table":
                out += [comparison.markdown_table(args[0], args[1])]
            else:
                out += [f"![{args[1]}](figures/{args[0]})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>",
               "</head><body>"]
        for kind, *args in self.blocks:
            if kind == "h":
                out.append(f"<h{args[0]}>{_inline(args[1])}</h{args[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(args[0])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in args[0])
                           + "</ul>")
            elif kind == "table":
                rows, columns = args
                head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                body = "".join("<tr>" + "".join(
                    f"<td>{html.escape(comparison.format_cell(r.get(c), c))}</td>"
                    for c in columns) + "</tr>" for r in rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode((self.folder / "figures" / args[0]).read_bytes())
                out.append(f'<figure><img alt="{html.escape(args[1])}" '
                           f'src="data:image/png;base64,{data.decode("ascii")}">'
                           f"<figcaption>{html.escape(args[1])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "th{background:#f0f3f7}tr:nth-child(even) td{background:#fafafa}"
        "img{max-width:100%;height:auto}figure{margin:1em 0}"
        "figcaption{color:#666;font-size:.85em}code{background:#f3f3f3;padding:0 .2em}"
        "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}")


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` and [links](url) turned into their HTML."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped)


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

    def fetch(self, run_id: str, artifact: str, stem: str) -> str | None:
        name = self.name(stem)
        if _fetch(self.client, run_id, artifact, self.dir / name):
            return name
        self.used.discard(name)
        return None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _name(run: Run) -> str:
    return run.info.run_name or run.info.run_id


def _header(doc: Document, experiment: str, tracking_uri: str, sel: Selection,
            run_id: str, run_name: str) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    url = tracking.experiment_url(tracking_uri, sel.experiment_id)
    link = f"[{url}]({url})" if tracking.has_ui(tracking_uri) else f"`{url}`"
    doc.heading(1, f"Experiment report: {experiment}")
    items = [f"Generated {when} by `cnnflow report`.",
             f"MLflow experiment `{experiment}` (id {sel.experiment_id}): {link}",
             f"Logged into MLflow run `{run_name}` (`{run_id}`) under `report/`."]
    if sel.pipeline is not None:
        items.append(f"Pipeline run `{_name(sel.pipeline)}` (`{sel.pipeline.info.run_id}`).")
        tags = sel.pipeline.data.tags
        if registry.SELECTION_METRIC_TAG in tags and registry.JUDGEMENT_METRIC_TAG in tags:
            line = registry.criteria_line(tags[registry.SELECTION_METRIC_TAG],
                                          tags[registry.JUDGEMENT_METRIC_TAG])
            items.append(f"{line[:1].upper()}{line[1:]}.")
    else:
        items.append("No pipeline run given: the latest finished runs of the experiment.")
    doc.bullets(items)


def _eda_section(doc: Document, figs: _Figures, sel: Selection) -> None:
    doc.heading(2, "Dataset")
    run = sel.eda
    if run is None:
        doc.para("No finished eda run in this experiment: run `cnnflow eda` for a dataset "
                 "summary.")
        return
    dataset = run.data.tags.get(DATASET_TAG, "")
    doc.para(f"From eda run `{_name(run)}` (`{run.info.run_id}`)"
             + (f", dataset `{dataset}`." if dataset else "."))
    metrics = run.data.metrics
    rows = [{"metric": k, "value": _number(metrics[k])} for k in EDA_METRICS if k in metrics]
    if rows:
        doc.table(rows, ["metric", "value"])
    findings = _eda_findings(figs.client, run.info.run_id)
    if findings:
        doc.heading(3, "Findings")
        doc.bullets(findings)
    for artifact, alt in EDA_FIGURES.items():
        if name := figs.fetch(run.info.run_id, f"report/{artifact}", f"eda-{artifact[:-4]}"):
            doc.figure(name, alt)


def _label_issues_section(doc: Document, figs: _Figures, tracking_uri: str,
                          exp_id: str) -> None:
    """The latest `label-issues` run of the experiment: how many, the first few, its grid."""
    doc.heading(3, "Label issues")
    found = _search(figs.client, exp_id, label_issues.STEP)
    if not found:
        doc.para("No label-issues run in this experiment: `cnnflow train --cv 5 "
                 "--find-label-issues true` ranks likely mislabelled images for review.")
        return
    run = found[0]
    count = int(run.data.metrics.get("n_label_issues", 0))
    doc.para(f"Run [{_name(run)}]({tracking.run_url(tracking_uri, exp_id, run.info.run_id)}) "
             f"flags {count} likely mislabelled image{'s' * (count != 1)} out of "
             f"{int(run.data.metrics.get('n_images', 0))} (cross-validation run "
             f"`{run.data.tags.get(CV_PARENT_TAG, '?')}`); nothing was changed. Review "
             "`label_issues.csv`, then leave the confirmed ones out with "
             "`cnnflow train --exclude-file`.")
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        local = _fetch(figs.client, run.info.run_id,
                       f"{label_issues.ARTIFACT_DIR}/{label_issues.FILES['issues']}",
                       Path(tmp) / "issues.csv")
        rows = read_csv(local)[:LABEL_ISSUE_ROWS] if local else []
    if rows:
        doc.table(rows, ["path", "given_label", "suggested_label", "quality_score"])
    if name := figs.fetch(run.info.run_id,
                          f"{label_issues.ARTIFACT_DIR}/{label_issues.FILES['grid']}",
                          "label-issues"):
        doc.figure(name, "likely mislabelled images: given -> suggested label")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _eda_findings(client: MlflowClient, run_id: str) -> list[str]:
    """The bullet list under `## Findings` in the eda run's report.md."""
    with tempfile.TemporaryDirectory(prefix="cnnflow-report-") as tmp:
        local = _fetch(client, run_id, "report/report.md", Path(tmp) / "report.md")
        if local is None:
            return []
        text = local.read_text(errors="replace")
    found, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Findings"
        elif inside and line.startswith("- "):
            found.append(line[2:].strip())
    return found


def _comparison_rows(client: MlflowClient, experiment: str, sel: Selection
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """compare_runs' rows of the selected runs (train runs in order, the ensemble last), and
    the cost rows: each of those runs (format `pytorch`) followed by the rows of its newest
    finished export run, the PyTorch reference and each format (none when never exported)."""
    order = [r.info.run_id for r in sel.train]
    if sel.ensemble is not None:
        order.append(sel.ensemble.info.run_id)
    compared = comparison.compare_runs(client, experiment)
    by_id = {r["run_id"]: r for r in compared if not r.get(comparison.SOURCE_RUN_ID)}
    newest: dict[str, str] = {}  # source run id -> its newest export run id
    formats: dict[str, list[dict[str, Any]]] = {}
    for row in compared:  # a source's export rows come newest first
        source = row.get(comparison.SOURCE_RUN_ID)
        if source and newest.setdefault(source, row["run_id"]) == row["run_id"]:
            formats.setdefault(source, []).append(row)
    ids = [rid for rid in order if rid in by_id]
    rows = [{ours: by_id[rid].get(theirs) for ours, theirs in TABLE_COLUMNS.items()}
            for rid in ids]
    return rows, [r for rid in ids for r in (by_id[rid], *formats.get(rid, []))]


def _models_section(doc: Document, figs: _Figures, rows: list[dict[str, Any]],
                    costs: list[dict[str, Any]], sel: Selection) -> None:
    doc.heading(2, "Models compared")
    doc.para("Validation accuracy is the best epoch's; test metrics and cost come from "
             "`cnnflow evaluate` (empty when a run was not evaluated).")
    doc.table(rows, list(TABLE_COLUMNS))
    doc.heading(2, "Training curves")
    histories = {_name(r): h for r in sel.train if (h := run_history(figs.client, r.info.run_id))}
    if len(histories) > 1:
        name = figs.name("curves-all-models")
        plots.plot_curves_all(histories, figs.dir / name)
        doc.figure(name, "training curves of every model (val solid, train dashed)")
    for run in sel.train:
        name = _curves(figs, run)
        if name:
            doc.heading(3, _name(run))
            doc.figure(name, f"training curves of {_name(run)}")
        else:
            doc.para(f"`{_name(run)}`: no training curves logged.")
    doc.heading(2, "Cost")
    costed = [{**r, "run": _cost_label(r, costs)} for r in costs
              if any(r.get(m) is not None for m, _ in plots.COST_METRICS)]
    if costed:
        name = figs.name("cost")
        plots.plot_cost(costed, figs.dir / name)
        doc.figure(name, "latency p50, model size and parameters per model and format")
    else:
        doc.para("No cost metrics yet: `cnnflow evaluate` measures latency, size and "
                 "parameters.")
    if any(r["format"] != comparison.REFERENCE_FORMAT for r in costs):
        doc.para("One row per format: the run as `cnnflow evaluate` measured it, then its "
                 "newest `cnnflow export`, which measures the PyTorch model (`pytorch`) and "
                 "each exported format side by side on the same test images and threads, so "
                 "compare those rows with each other; `latency_speedup` is PyTorch's latency "
                 "p50 over the format's. A format that failed its gate is not registered.")
        doc.table(costs, list(FORMAT_COLUMNS))


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


def _curves(figs: _Figures, run: Run) -> str | None:
    """figures/curves.png of the run; else drawn from its history."""
    if name := figs.fetch(run.info.run_id, "figures/curves.png", f"curves-{_name(run)}"):
        return name
    history = run_history(figs.client, run.info.run_id)
    if not history:
        return None
    name = figs.name(f"curves-{_name(run)}")
    plots.plot_curves(history, figs.dir / name)
    return name


def _confusion_section(doc: Document, figs: _Figures, client: MlflowClient,
                       experiment: str, sel: Selection) -> None:
    doc.heading(2, "Confusion matrices")
    model_name = registry.default_name(experiment)
    champion = registry.get_alias(client, model_name, registry.CHAMPION)
    if champion is None or not champion.run_id:
        doc.para(f"No champion: registered model `{model_name}` has no `@champion` yet "
                 "(cnnflow evaluate registers and promotes).")
    else:
        run = _get_run(client, champion.run_id)
        label = _name(run) if run else champion.run_id
        doc.heading(3, f"Champion: {model_name} v{champion.version} ({label})")
        if name := figs.fetch(champion.run_id, CONFUSION, "confusion-champion"):
            doc.figure(name, f"confusion matrix of the champion {label}")
        else:
            doc.para(f"Run `{label}` has no `{CONFUSION}`: evaluate it on the test split.")
        _explain_figure(doc, figs, run, label, "explain-champion")
    if sel.ensemble is None:
        doc.para("No ensemble run: `cnnflow ensemble` combines the trained models.")
        return
    label = _name(sel.ensemble)
    doc.heading(3, f"Ensemble: {label}")
    if name := figs.fetch(sel.ensemble.info.run_id, CONFUSION, "confusion-ensemble"):
        doc.figure(name, f"confusion matrix of {label}")
    else:
        doc.para(f"Run `{label}` has no `{CONFUSION}`.")
    _explain_figure(doc, figs, sel.ensemble, label, "explain-ensemble")


def _explain_figure(doc: Document, figs: _Figures, run: Run | None, label: str,
                    stem: str) -> None:
    """evaluate's Grad-CAM overview of the run (its `cnnflow.explain_overview` tag), right
    after its confusion matrix; nothing when evaluate drew none (--explain-images 0)."""
    artifact = run.data.tags.get(EXPLAIN_OVERVIEW_TAG) if run is not None else None
    if artifact and (name := figs.fetch(run.info.run_id, artifact, stem)):
        split = artifact.split("/")[1] if artifact.count("/") > 1 else "evaluated"
        doc.figure(name, f"Grad-CAM of {label}'s highest-loss and confused {split} images "
                         "(where the evidence for the predicted class sits)")


def _tuning_section(doc: Document, figs: _Figures, sel: Selection) -> None:
    if not sel.tune:
        return
    doc.heading(2, "Tuning")
    for run in sel.tune:
        params, metrics = run.data.params, run.data.metrics
        doc.heading(3, _name(run))
        metric = params.get("metric", "objective")
        items = []
        if "best_value" in metrics:
            items.append(f"best {metric}: {comparison.format_cell(metrics['best_value'])}"
                         + (f" (trial {run.data.tags['cnnflow.best_trial']})"
                            if BEST_TRIAL_TAG in run.data.tags else ""))
        counts = [f"{metrics[k]:.0f} {k.split('_')[-1]}" for k in
                  ("n_trials_complete", "n_trials_pruned", "n_trials_failed") if k in metrics]
        if counts:
            items.append("trials: " + ", ".join(counts))
        if retrained := run.data.tags.get(RETRAINED_RUN_TAG):
            items.append(f"best configuration retrained as run `{retrained}`")
        doc.bullets(items)
        best = [{"param": k[len("best_"):], "value": v} for k, v in sorted(params.items())
                if k.startswith("best_")]
        if best:
            doc.table(best, ["param", "value"])
        try:
            pngs = sorted(f.path for f in figs.client.list_artifacts(run.info.run_id,
                                                                     "tune/figures")
                          if f.path.endswith(".png"))
        except MlflowException:
            pngs = []
        for artifact in pngs:
            stem = Path(artifact).stem
            if name := figs.fetch(run.info.run_id, artifact, f"tune-{_name(run)}-{stem}"):
                doc.figure(name, f"{stem.replace('_', ' ')} ({_name(run)})")


def _registry_section(doc: Document, client: MlflowClient, experiment: str) -> None:
    model_name = registry.default_name(experiment)
    doc.heading(2, "Registry")
    rows = registry.version_summary(client, model_name)
    if not rows:
        doc.para(f"Registered model `{model_name}` has no versions yet.")
        return
    doc.para(f"Registered model `{model_name}`, newest version first.")
    names: dict[str, str] = {}
    for row in rows:
        rid = row.get("run_id") or ""
        if rid and rid not in names:
            run = _get_run(client, rid)
            names[rid] = f"{_name(run)} ({rid[:8]})" if run else rid
        row["run"] = names.get(rid, "")
    doc.table(rows, ["version", "aliases", "run", "decision", "reason"])


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
        doc, figs = Document(tmp), _Figures(tmp, client)
        _header(doc, experiment, tracking_uri, sel, run_id, run_name)
        _eda_section(doc, figs, sel)
        _label_issues_section(doc, figs, tracking_uri, sel.experiment_id)
        _models_section(doc, figs, *_comparison_rows(client, experiment, sel), sel)
        _confusion_section(doc, figs, client, experiment, sel)
        _tuning_section(doc, figs, sel)
        _registry_section(doc, client, experiment)
        (tmp / "report.md").write_text(doc.markdown())
        (tmp / "report.html").write_text(doc.html(f"cnnflow report: {experiment}"))
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
