"""`cnnflow preprocess` and `train --preprocess-run` against a real MLflow server."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, history, make_image_folder, runs_of, subprocess_env, write_image
from mlflow import MlflowClient

from components.data.datasets import (
    SPLITS,
    ImageDataset,
    build_transform,
    load_splits,
    make_loaders,
)
from components.steps.params import PreprocessParams
from components.steps.preprocess import plan_split, prepared_dir, write_outputs
from pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights",
              "none", "--augmentation", "none", "--epochs", "2", "--patience", "0"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def preprocess(data: Path, experiment: str, *args: str):
    """Run `cnnflow preprocess`; returns the finished run."""
    result = invoke("preprocess", "--data", str(data), "--experiment", experiment,
                    "--num-workers", "0", *args)
    assert result.exit_code == 0, result.output
    return runs_of(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), experiment, "preprocess")[-1]


def manifest(client: MlflowClient, run_id: str, tmp: Path) -> list[dict[str, str]]:
    path = client.download_artifacts(run_id, "data/manifest.csv", str(tmp))
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))



def flat_folder_with_duplicates(root: Path) -> Path:
    make_image_folder(root, {"red": 10, "green": 10, "blue": 10})
    for i in range(5):  # copies under other names: the seeded split scatters some of them
        shutil.copy(root / "red" / f"img{i:03d}.png", root / "red" / f"copy{i}.png")
    return root


def test_split_is_stratified_reproducible_and_leak_free(tracking, image_folder, tmp_path):
    data = image_folder({"red": 10, "green": 10, "blue": 10})
    first = preprocess(data, "pp-split")
    second = preprocess(data, "pp-split")
    other = preprocess(data, "pp-split", "--seed", "7")
    assert [first.info.run_name, second.info.run_name] == ["preprocess-v1", "preprocess-v2"]
    assert first.info.status == "FINISHED" and first.data.tags["cnnflow.step"] == "preprocess"
    rows = manifest(tracking, first.info.run_id, tmp_path / "a")
    assert rows == manifest(tracking, second.info.run_id, tmp_path / "b")
    digest = first.data.tags["cnnflow.dataset_digest"]
    assert digest == second.data.tags["cnnflow.dataset_digest"]
    assert digest != other.data.tags["cnnflow.dataset_digest"]
    # The same split train makes from the folder: one splitter, one digest.
    assert digest == load_splits(data, 0.2, 0.2, seed=42).digest()

    assert list(rows[0]) == ["path", "label", "class_index", "split", "sha1", "width", "height"]
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("red", "green", "blue"):
            assert sum(r["split"] == split and r["label"] == cls for r in rows) == n
    for row in rows:
        file = data / row["path"]
        assert row["path"] == f"{row['label']}/{file.name}"
        assert row["sha1"] == hashlib.sha1(file.read_bytes()).hexdigest()
        assert (row["width"], row["height"]) == ("16", "16")
    assert first.data.metrics["n_train"] == 18 and first.data.metrics["n_leakage_moved"] == 0


def test_leakage_guard_moves_and_excludes(tracking, messy_folder, tmp_path):
    run = preprocess(messy_folder, "pp-messy")
    m = run.data.metrics
    assert m["n_leakage_moved"] == 2 and m["n_label_conflicts_excluded"] == 2
    rows = manifest(tracking, run.info.run_id, tmp_path / "m")
    split_of = {r["path"]: r["split"] for r in rows}
    assert split_of["train/red/img000.png"] == "test"  # its copy is test/red/leak.png
    assert split_of["train/green/img001.png"] == "val"  # its copy is val/green/leak.png
    for gone in ("train/red/img003.png", "train/green/conflict.png", "train/blue/truncated.png"):
        assert gone not in split_of
    splits_of_hash: dict[str, set[str]] = {}
    for r in rows:
        splits_of_hash.setdefault(r["sha1"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_hash.values())
    assert split_of["train/red/dup.png"] == split_of["train/red/img002.png"] == "train"
    skipped = tracking.download_artifacts(run.info.run_id, "data/skipped_files.csv",
                                          str(tmp_path / "s"))
    text = Path(skipped).read_text()
    assert "train/blue/truncated.png" in text and "train/blue/notes.txt" in text
    assert text.count("label conflict") == 2
    moved = tracking.download_artifacts(run.info.run_id, "data/leakage_moved.csv",
                                        str(tmp_path / "l"))
    assert len(Path(moved).read_text().splitlines()) == 3  # header + 2 moves


def test_flat_folder_duplicates_never_span_two_splits(tracking, tmp_path):
    data = flat_folder_with_duplicates(tmp_path / "dups")
    before = load_splits(data, 0.2, 0.2, seed=42)
    split_of = {before.relpath(p): s for s in SPLITS for p, _ in before.split(s)}
    scattered = sum(split_of[f"red/img{i:03d}.png"] != split_of[f"red/copy{i}.png"]
                    for i in range(5))
    assert scattered > 0  # the unguarded split leaks (else this test proves nothing)
    run = preprocess(data, "pp-dups")
    rows = manifest(tracking, run.info.run_id, tmp_path / "m")
    by_hash: dict[str, set[str]] = {}
    for r in rows:
        by_hash.setdefault(r["sha1"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_hash.values()) and len(rows) == 35
    assert run.data.metrics["n_leakage_moved"] == scattered


def clean_folder(root: Path) -> Path:
    """20-px images (so the 16-px cache really resizes), with RGBA and palette ones too."""
    make_image_folder(root, {"red": 12, "green": 12, "blue": 12}, size=20)
    write_image(root / "red" / "rgba.png", (220, 30, 30), 20, seed=501, mode="RGBA")
    write_image(root / "blue" / "palette.png", (30, 60, 220), 20, seed=502, mode="P")
    return root


def test_cached_pixels_equal_decoded_pixels_for_every_preset(tmp_path):
    data = clean_folder(tmp_path / "clean")
    plan = plan_split(PreprocessParams(data=str(data), cache=True, image_size=16,
                                       num_workers=0), tmp_path / "scratch")
    write_outputs(plan, tmp_path / "out")
    splits = plan.splits
    arrays = {s: tmp_path / "out" / "cache" / f"{s}_images.npy" for s in SPLITS}
    assert np.load(arrays["train"]).shape == (len(splits.train), 16, 16, 3)
    for preset in ("none", "light", "strong"):
        decoded = make_loaders(splits, 16, 8, preset, num_workers=0, seed=3)
        cached = make_loaders(splits, 16, 8, preset, num_workers=0, seed=3, arrays=arrays)
        for split in SPLITS:
            torch.manual_seed(11)
            a = [(x.clone(), y.clone()) for x, y in decoded[split]]
            torch.manual_seed(11)
            b = [(x.clone(), y.clone()) for x, y in cached[split]]
            assert len(a) == len(b)
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(ya, yb) and torch.equal(xa, xb), (preset, split)
    # and the eval transform of a single decoded file equals the cached row
    tf = build_transform("none", 16, train=False)
    first = ImageDataset(splits.val[:1], tf)[0][0]
    assert torch.equal(first, make_loaders(splits, 16, 1, "none", num_workers=0,
                                           arrays=arrays)["val"].dataset[0][0])


def test_training_from_a_preprocess_run_equals_training_from_the_folder(tracking, tmp_path):
    data = clean_folder(tmp_path / "clean")
    cached = preprocess(data, "pp-train", "--cache", "true", "--image-size", "16")
    plain = preprocess(data, "pp-train")
    assert {f.path for f in tracking.list_artifacts(cached.info.run_id, "cache")} == {
        f"cache/{s}_{kind}.npy" for s in SPLITS for kind in ("images", "labels")} | {
        "cache/cache.json"}
    ids = []
    for extra in ([], ["--preprocess-run", cached.info.run_id],
                  ["--preprocess-run", plain.info.run_id]):
        result = invoke("train", "--data", str(data), "--experiment", "pp-train", *TRAIN_FAST,
                        *extra)
        assert result.exit_code == 0, result.output
        ids.append(runs_of(tracking, "pp-train", "train")[-1].info.run_id)
    runs = [tracking.get_run(i) for i in ids]
    assert [r.data.tags["cnnflow.data_source"] for r in runs] == ["folder", "cache", "manifest"]
    digests = {r.data.tags["cnnflow.dataset_digest"] for r in runs}
    assert digests == {cached.data.tags["cnnflow.dataset_digest"]}
    assert runs[1].data.tags["cnnflow.preprocess_run"] == cached.info.run_id
    assert runs[1].data.params["preprocess_run"] == cached.info.run_id
    for metric in ("train_loss", "train_acc", "val_loss", "val_acc"):
        reference = history(tracking, ids[0], metric)
        assert [s for s, _ in reference] == [1, 2]
        assert history(tracking, ids[1], metric) == reference, metric
        assert history(tracking, ids[2], metric) == reference, metric
    (dataset_input,) = runs[1].inputs.dataset_inputs
    assert dataset_input.dataset.digest == cached.data.tags["cnnflow.dataset_digest"][:32]
    assert dataset_input.dataset.name == "clean"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_a_preprocess_run_logged_with_the_old_path_digest_still_trains(tracking, tmp_path):
    """Runs from before the content digest keep working; new training runs get the new one."""
    data = clean_folder(tmp_path / "old")
    run = preprocess(data, "pp-legacy")
    rows = manifest(tracking, run.info.run_id, tmp_path / "m")
    old = hashlib.sha256("\n".join(sorted(f"{r['path']},{r['label']},{r['split']}"
                                          for r in rows)).encode()).hexdigest()
    tracking.set_tag(run.info.run_id, "cnnflow.dataset_digest", old)
    shutil.rmtree(prepared_dir() / run.info.run_id, ignore_errors=True)
    result = invoke("train", "--experiment", "pp-legacy", "--preprocess-run", run.info.run_id,
                    *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    trained = runs_of(tracking, "pp-legacy", "train")[-1]
    content = load_splits(data, 0.2, 0.2, seed=42).digest()
    assert trained.data.tags["cnnflow.dataset_digest"] == content != old


def _no_images(tmp: Path) -> Path:
    (tmp / "empty" / "a").mkdir(parents=True)
    (tmp / "empty" / "b").mkdir(parents=True)
    (tmp / "empty" / "a" / "x.txt").write_text("x")
    return tmp / "empty"


def _tiny_class(tmp: Path) -> Path:
    return make_image_folder(tmp / "tiny", {"a": 2, "b": 10})


@pytest.mark.parametrize("make, args, message", [
    (lambda tmp: tmp / "nope", [], "does not exist"),
    (_no_images, [], "no image files"),
    (_tiny_class, ["--train-ratio", "0.7"], "= 1.1, not 1"),
    (_tiny_class, [], "the val split gets no images of class 'a'"),
    (_tiny_class, ["--image-size", "7"], "image_size=7 is below 8"),
    (_tiny_class, ["--num-workers", "-2"], "num_workers=-2"),
    (_tiny_class, ["--near-dup-distance", "-1"], "near_dup_distance=-1 is below 0"),
])
def test_bad_input_is_one_line_and_creates_no_run(tracking, tmp_path, make, args, message):
    result = CliRunner().invoke(cli, ["preprocess", "--data", str(make(tmp_path)),
                                      "--experiment", "pp-bad", "--num-workers", "0", *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "pp-bad") == []


def test_seed_split_shapes_are_accepted(tracking, image_folder):
    data = image_folder({"a": 10, "b": 10})
    for shares in (("0.7", "0.3", "0"), ("0.9", "0.1", "0")):
        run = preprocess(data, "pp-shapes", "--train-ratio", shares[0], "--val-ratio",
                         shares[1], "--test-ratio", shares[2])
        assert run.data.metrics["n_test"] == 0 and run.data.metrics["n_val"] > 0


def test_deleted_files_and_wrong_runs_are_one_line_errors_before_a_train_run(
        tracking, image_folder):
    data = image_folder({"a": 6, "b": 6})
    run = preprocess(data, "pp-deleted")
    eda_like = tracking.create_run(run.info.experiment_id, tags={"cnnflow.step": "eda"})
    (data / "a" / "img001.png").unlink()
    cases = [
        (["--preprocess-run", run.info.run_id], "1 of the 12 images in the manifest"),
        (["--preprocess-run", "0123456789abcdef"], "does not exist"),
        (["--preprocess-run", eda_like.info.run_id], "is not a cnnflow preprocess run"),
        (["--preprocess-run", run.info.run_id, "--data", str(image_folder())],
         "is not the dataset of preprocess run"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["train", "--experiment", "pp-deleted", *TRAIN_FAST,
                                          *args])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(errors) == 1 and message in errors[0], \
            result.output
    assert runs_of(tracking, "pp-deleted", "train") == []


def test_a_failure_inside_the_run_ends_it_failed(tracking, image_folder, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("components.steps.preprocess.write_cache", broken)
    result = CliRunner().invoke(cli, ["preprocess", "--data", str(image_folder()),
                                      "--experiment", "pp-fail", "--cache", "true",
                                      "--num-workers", "0"])
    assert result.exit_code != 0
    (run,) = runs_of(tracking, "pp-fail")
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags["cnnflow.error"]
    assert not (prepared_dir() / run.info.run_id).exists()
    assert not list(prepared_dir().glob(".tmp-*"))


def test_mlflow_run_entry_points(mlflow_server, image_folder, tmp_path):
    data = image_folder({"a": 8, "b": 8})
    env = subprocess_env(mlflow_server)
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(ROOT), "-e", "preprocess", "--env-manager", "local",
         "--experiment-name", "pp-mlproject", "-P", f"data={data}", "-P", "cache=true",
         "-P", "image_size=16", "-P", "train_ratio=0.5", "-P", "val_ratio=0.25",
         "-P", "test_ratio=0.25"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = runs_of(client, "pp-mlproject")
    assert run.info.status == "FINISHED" and run.info.run_name == "preprocess-v1"
    assert run.data.params["cache"] == "true" and run.data.metrics["n_val"] == 4
    assert "cache/cache.json" in {f.path for f in client.list_artifacts(run.info.run_id,
                                                                         "cache")}
    # train from it through MLproject too (mlflow logs -P values itself: they must agree)
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "--experiment-name", "pp-mlproject", "-P", f"preprocess_run={run.info.run_id}",
         "-P", f"data={data}", "-P", "val_ratio=0.25", "-P", "test_ratio=0.25",
         "-P", "epochs=1", "-P", "image_size=16", "-P", "num_workers=0", "-P", "weights=none"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = runs_of(client, "pp-mlproject", "train")[-1]
    assert trained.info.status == "FINISHED"
    assert trained.data.tags["cnnflow.data_source"] == "cache"
    assert trained.data.tags["cnnflow.dataset_digest"] == run.data.tags["cnnflow.dataset_digest"]
