"""Grad-CAM: the registry's layer per model, maps that point at the evidence, evaluate's
gallery, and `cnnflow explain` on a folder of photos, against a real MLflow server."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import runs_of
from PIL import Image

from components.names import (
    EXPLAIN_OVERVIEW_TAG,
    MODEL_URI_TAG,
    SOURCE_MODEL_URI_TAG,
    SOURCE_RUN_TAG,
)
from components.nn.explain import grad_cam
from components.nn.models import create_model, get_spec, list_models
from pipelines.cli import cli

SIZE = 32
COLOURS = {"red": (240, 40, 40), "green": (40, 230, 60), "blue": (40, 80, 250)}
QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def square_image(path: Path, colour: str, quadrant: tuple[int, int],
                 rng: np.random.Generator) -> Path:
    """A noisy dark 32-px image with a bright square of the class colour somewhere inside
    one quadrant (the quadrant varies, so only the square tells the class)."""
    arr = rng.normal(40, 15, (SIZE, SIZE, 3))
    half, side = SIZE // 2, 7
    top = quadrant[0] * half + rng.integers(1, half - side)
    left = quadrant[1] * half + rng.integers(1, half - side)
    arr[top:top + side, left:left + side] = (np.array(COLOURS[colour])
                                             + rng.normal(0, 10, (side, side, 3)))
    other = QUADRANTS[(QUADRANTS.index(quadrant) + rng.integers(1, 4)) % 4]  # a distractor:
    top = other[0] * half + rng.integers(1, half - side)  # a grey square, in both classes
    left = other[1] * half + rng.integers(1, half - side)
    arr[top:top + side, left:left + side] = rng.normal(200, 10, (side, side, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


def peak_quadrant(cam: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(row >= cam.shape[0] / 2), int(col >= cam.shape[1] / 2)


@pytest.fixture(scope="module")
def quadrants(mlflow_server, tmp_path_factory):
    """custom_cnn trained (`cnnflow train`) and evaluated (`cnnflow evaluate`) on 3 classes:
    a red, green or blue square, in a quadrant the file name records (`q<row><col>_...`)."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("quadrants")
    rng = np.random.default_rng(0)
    data = root / "quadrants"
    for colour in COLOURS:
        for i in range(24):
            q = QUADRANTS[i % 4]
            square_image(data / colour / f"q{q[0]}{q[1]}_{i:02d}.png", colour, q, rng)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(root)
        result = invoke("train", "--data", str(data), "--model", "custom_cnn", "--epochs", "3",
                        "--image-size", str(SIZE), "--batch-size", "16", "--weights", "none",
                        "--augmentation", "none", "--patience", "0", "--lr", "0.003")
        assert result.exit_code == 0, result.output
        from mlflow import MlflowClient

        client = MlflowClient(mlflow_server)
        (run,) = runs_of(client, "quadrants", "train")
        result = invoke("evaluate", "--run-id", run.info.run_id, "--explain-images", "3",
                        "--cost", "false", "--registered-model", "quadrants-cam")
        assert result.exit_code == 0, result.output
    return SimpleNamespace(data=data, run_id=run.info.run_id, uri=mlflow_server, root=root,
                           client=client)


# --------------------------------------------------------------------------- the layer


def test_every_registered_model_gives_a_map_of_the_input_size():
    for name in list_models():
        size = max(32, get_spec(name).min_image_size)
        model, _ = create_model(name, 3, image_size=size)
        assert model.explained_layer is model.backbone.get_submodule(model.cam_layer), name
        cam = grad_cam(model, torch.randn(2, 3, size, size), [0, 2])
        assert cam.shape == (2, size, size), name
        assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1, name


# --------------------------------------------------------------------------- evaluate


def test_the_map_points_at_the_evidence(quadrants):
    """The Grad-CAM peak of the true class lies in the quadrant holding the square, for most
    test images."""
    from components.serving.explain import explain_images
    from components.serving.predict import load_model

    client = quadrants.client
    run = client.get_run(quadrants.run_id)
    model = load_model(run.data.tags[MODEL_URI_TAG])
    local = client.download_artifacts(quadrants.run_id, "data/manifest.csv",
                                      str(quadrants.root / "manifest"))
    with open(local) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert len(rows) >= 12  # 20 % of 72
    images = [Image.open(quadrants.data / r["path"]).convert("RGB") for r in rows]
    labels = [model.class_names.index(r["label"]) for r in rows]
    explained = explain_images(model, images, labels)
    hits = [peak_quadrant(e.cam) == tuple(int(c) for c in Path(r["path"]).name[1:3])
            for e, r in zip(explained, rows, strict=True)]
    assert np.mean(hits) >= 0.7, hits
    # The same network untrained finds the grey distractor as often as the coloured square.
    from components.serving.classifier import ImageClassifier

    untrained = create_model("custom_cnn", 3, image_size=SIZE)[0].state_dict()
    fresh = ImageClassifier().build(model.config, untrained)
    misses = [peak_quadrant(e.cam) == tuple(int(c) for c in Path(r["path"]).name[1:3])
              for e, r in zip(explain_images(fresh, images, labels), rows, strict=True)]
    assert np.mean(misses) < 0.7, misses
    # Averaging a member with itself in an ensemble gives the same map, and shows each member.
    from components.serving.ensemble import EnsembleClassifier

    twin = EnsembleClassifier().build({"vote": "soft", "weights": [0.5, 0.5]}, [model, model])
    [both] = explain_images(twin, images[:1], labels[:1])
    assert len(both.members) == 2 and np.allclose(both.cam, explained[0].cam, atol=1e-5)


def test_evaluate_logs_the_gallery_overview_and_tag(quadrants):
    client = quadrants.client
    run = client.get_run(quadrants.run_id)
    overview = "evaluation/test/explain/overview.png"
    assert run.data.tags[EXPLAIN_OVERVIEW_TAG] == overview
    files = {Path(f.path).name for f in client.list_artifacts(quadrants.run_id,
                                                              "evaluation/test/explain")}
    assert {"overview.png", "gallery.csv"} <= files
    local = client.download_artifacts(quadrants.run_id, "evaluation/test/explain/gallery.csv",
                                      str(quadrants.root / "gallery"))
    with open(local) as fh:
        rows = list(csv.DictReader(fh))
    # 3 highest-loss images, then at most 3 from the confusion pairs; one figure each.
    assert 3 <= len(rows) <= 6
    assert [r["reason"] for r in rows[:3]] == ["loss"] * 3
    assert {r["figure"] for r in rows} == files - {"overview.png", "gallery.csv"}
    losses = [float(r["loss"]) for r in rows[:3]]
    assert losses == sorted(losses, reverse=True)


def test_gallery_takes_the_worst_then_each_confusion_pair():
    from components.steps.evaluate import gallery_indices

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1],
                      [0.45, 0.5, 0.05], [0.4, 0.55, 0.05], [0.5, 0.1, 0.4]])
    labels = np.array([0, 1, 2, 0, 0, 0, 2])
    # losses: image 3 (-log .3) > 5 (.4) > 6 (.4)... the pair (0 -> 1) has images 3, 5, 4.
    chosen = gallery_indices(probs, labels, 2)
    assert chosen[:2] == [(3, "loss"), (5, "loss")] or chosen[:2] == [(3, "loss"), (6, "loss")]
    extra = [i for i, reason in chosen if reason == "confusion"]
    assert len(extra) <= 2 and not set(extra) & {i for i, _ in chosen[:2]}
    assert gallery_indices(probs, labels, 0) == []


# --------------------------------------------------------------------------- cnnflow explain


def test_explain_a_folder_writes_figures_top3_and_one_page(quadrants, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", quadrants.uri)
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    rng = np.random.default_rng(7)
    square_image(photos / "a.png", "red", (0, 0), rng)
    square_image(photos / "sub" / "b.png", "blue", (1, 1), rng)
    square_image(photos / "c.png", "blue", (0, 1), rng)
    (photos / "notes.txt").write_text("not an image")
    result = invoke("explain", "--model", quadrants.run_id, "--images", str(photos))
    assert result.exit_code == 0, result.output
    run = quadrants.client.get_run(quadrants.run_id)
    out = tmp_path / "reports" / "explain" / f"photos_{run.info.run_name}"
    assert result.stdout.strip().splitlines()[-1] == str(out / "index.html")
    html = (out / "index.html").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert len(figures) == 3
    assert sorted(re.findall(r'<img src="([^"]+)"', html)) == figures
    assert html.count("<tr><td>") == 3 * 3  # top-3 per image
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == ["a.png", "c.png", "sub/b.png"]
    assert all(r["top3"] and float(r["top1_prob"]) >= float(r["top2_prob"]) for r in rows)
    (explain_run,) = runs_of(quadrants.client, "quadrants", "explain")
    assert explain_run.data.tags[SOURCE_RUN_TAG] == quadrants.run_id
    logged = {Path(f.path).name for f in quadrants.client.list_artifacts(
        explain_run.info.run_id, "explain")}
    assert {"index.html", "predictions.csv", *figures} <= logged

    # A single file, through an "export run" that names its source: the source is explained.
    export = quadrants.client.create_run(
        explain_run.info.experiment_id,
        tags={SOURCE_RUN_TAG: quadrants.run_id,
              SOURCE_MODEL_URI_TAG: run.data.tags[MODEL_URI_TAG]})
    result = invoke("explain", "--model", export.info.run_id, "--images",
                    str(photos / "a.png"), "--out", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    assert "is an ONNX export" in result.output
    assert len(list((tmp_path / "one").glob("*.png"))) == 1


def test_explain_bad_input_is_one_line_and_leaves_nothing(quadrants, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", quadrants.uri)
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    bare = quadrants.client.create_run(
        quadrants.client.get_experiment_by_name("quadrants").experiment_id).info.run_id
    before = len(runs_of(quadrants.client, "quadrants"))
    cases = {
        "does not exist": ("--model", quadrants.run_id, "--images", str(tmp_path / "nope")),
        "not an image": ("--model", quadrants.run_id, "--images", str(tmp_path / "notes.txt")),
        "no readable images": ("--model", quadrants.run_id, "--images", str(empty)),
        "has no logged model": ("--model", bare, "--images", str(empty)),
        "has no version 1": ("--model", "models:/no-such-model/1", "--images", str(empty)),
    }
    for words, args in cases.items():
        if words in ("has no logged model", "has no version 1"):  # a good image, so the model fails
            square_image(tmp_path / "ok" / "x.png", "red", (0, 0), np.random.default_rng(1))
            args = (*args[:3], str(tmp_path / "ok"))
        result = invoke("explain", *args, "--out", str(tmp_path / "out" / "x"))
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert words in lines[0], lines[0]
        assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()
    assert len(runs_of(quadrants.client, "quadrants")) == before


def test_the_mirror_links_the_overview_the_server_serves(quadrants, mongo_server):
    """What the dashboard's model detail shows: the overview link in `trainings`, served as a
    PNG by the MLflow server itself (the dashboard never calls MLflow)."""
    import requests
    from pymongo import MongoClient

    from components.mirror.sync import TRAININGS

    db_uri = f"{mongo_server}/explain_{quadrants.run_id[:8]}"
    result = CliRunner(env={"MLFLOW_TRACKING_URI": quadrants.uri, "MONGO_URI": db_uri}).invoke(
        cli, ["sync", "--experiments", "quadrants"])
    assert result.exit_code == 0, result.output
    client = MongoClient(db_uri, serverSelectionTimeoutMS=5000)
    try:
        doc = client[db_uri.rsplit("/", 1)[1]][TRAININGS].find_one({"_id": quadrants.run_id})
    finally:
        client.drop_database(db_uri.rsplit("/", 1)[1])
        client.close()
    url = doc["explain_overview_url"]
    assert url.startswith(quadrants.uri) and "label_issues" not in doc
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
