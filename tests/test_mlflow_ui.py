"""The MLflow UI as a new user meets it: the link `cnnflow run` prints, opened in a real browser."""

from __future__ import annotations

import re
import subprocess
from uuid import uuid4

import pytest
from helpers import (
    BIN,
    SCREENSHOTS,
    launch_chromium,
    make_image_folder,
    playwright_or_skip,
    subprocess_env,
)
from mlflow import MlflowClient

MODELS = ("lenet5", "custom_cnn")


def _metric_value(page, name: str) -> float:
    """The value the run page shows beside a metric's name (the overview's metrics table)."""
    row = page.locator('[role="row"]', has_text=name).first
    row.wait_for(timeout=30000)
    numbers = re.findall(r"\d+\.\d+|\d+", row.inner_text().replace(name, ""))
    assert numbers, row.inner_text()
    return float(numbers[0])


def test_the_printed_link_opens_the_training_view(mlflow_server, tmp_path):
    sync_playwright = playwright_or_skip()
    data = make_image_folder(tmp_path / "cups", {"cup": 8, "glass": 8})
    experiment = f"ui-{uuid4().hex[:6]}"
    done = subprocess.run(
        [str(BIN / "cnnflow"), "run", "--data", str(data), "--experiment", experiment,
         "--models", ",".join(MODELS), "--weights", "none", "--image-size", "16",
         "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--sync", "false",
         "--report", "false"],
        env=subprocess_env(mlflow_server), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = re.search(r"^(pipeline-v\d+): .*?(http://\S+)$", done.stdout, re.M)
    assert summary, done.stdout
    url = summary[2]
    assert url.startswith(f"{mlflow_server}/#/experiments/") and "workflowType" in url

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], "tags.`cnnflow.step` = 'pipeline'")[0]
    expected = parent.data.metrics[f"summary.{MODELS[0]}.test_acc"]

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, timeout=30000)
        page.get_by_text(summary[1], exact=True).first.wait_for(timeout=30000)
        for model in MODELS:  # the training runs, by name, as the parent's children
            page.get_by_text(f"{model}-v1", exact=True).first.wait_for(timeout=30000)
        shown = _metric_value(page, f"summary.{MODELS[0]}.test_acc")
        assert shown == pytest.approx(expected, abs=1e-3)
        body = page.inner_text("body")
        assert "Model training" in body and "Evaluation runs" not in body  # not the GenAI view
        page.screenshot(path=str(SCREENSHOTS / "mlflow_pipeline_run.png"), full_page=True)

        # The registered model's description is readable, with the real name to serve.
        name = f"{experiment}-classifier"
        page.goto(f"{mlflow_server}/#/models/{name}?workflowType=machine_learning",
                  timeout=30000)
        page.get_by_text(f"models:/{name}@champion").first.wait_for(timeout=30000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow_registered_model.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "mlflow_pipeline_run.png").stat().st_size > 10000
