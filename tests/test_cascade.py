"""`cnnflow cascade`: detector (or boxes made elsewhere) -> classifier on the crops.

A synthetic scene set: grey 96-px scenes, each with two coloured squares (red, green or blue:
the "detector" calls them `shape`) and one yellow square (`ball`) at known places, with YOLO
boxes; a classifier trained on crops of such squares re-labels every `shape`. Real MLflow
server, real `mlflow models serve`, randomly initialised detector weights saved to a file
(nothing is downloaded)."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner
from helpers import runs_of, serve_model
from PIL import Image

from components.data.boxes import Box, BoxesError, read_boxes
from components.nn.detectors import (
    DetectorError,
    coco_weights_file,
    get_detector,
    list_detectors,
    load_detector,
    save_detector,
)
from components.serving.cascade import (
    CASCADE_COLUMNS,
    CascadeError,
    CascadeSettings,
    Detection,
    crop,
    detection_metrics,
    filter_boxes,
    input_sizes,
)
from pipelines.cli import cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
BALL = (230, 210, 30)
SCENE, SIDE = 96, 22
CELLS = [(6, 8), (60, 10), (34, 62), (8, 66)]  # top-left corners of the objects
DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the fastest on a CPU


def _noise(rng: np.random.Generator, h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (h, w, 3)), 0, 255)


def crop_like(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A training image: a coloured square on the scenes' grey, as a padded crop shows it."""
    rng = np.random.default_rng(seed)
    arr = _noise(rng, 26, 26, (128, 128, 128))
    arr[2:24, 2:24] = _noise(rng, 22, 22, colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def yolo_line(cls: int, x: float, y: float, w: float, h: float, score: float | None = None,
              size: int = SCENE) -> str:
    fields = [cls, (x + w / 2) / size, (y + h / 2) / size, w / size, h / size]
    fields += [] if score is None else [score]
    return " ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in fields)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    """4 scenes; YOLO detections (shape/ball) and ground truth (red/green/blue/ball).

    The detections are the true boxes except: scene 0's ball is missed, scene 1 has an extra
    `ball` on the background, scene 2 a shifted duplicate of a shape (scored lower: NMS drops
    it), scene 3 a box scored 0.3 and a 4-px box (threshold and min-box drop them).
    """
    root = tmp_path_factory.mktemp("cascade")
    images, detections, truth = root / "scenes", root / "detections", root / "truth"
    for folder in (images, detections, truth):
        folder.mkdir()
    (detections / "classes.txt").write_text("shape\nball\n")
    (truth / "classes.txt").write_text("red\ngreen\nblue\nball\n")
    colour_names = list(COLOURS)
    expected = []  # (scene, box, final label)
    for s in range(4):
        rng = np.random.default_rng(100 + s)
        arr = _noise(rng, SCENE, SCENE, (128, 128, 128))
        det_lines, true_lines = [], []
        for k, (x, y) in enumerate(CELLS[:3]):
            x, y = x + s, y + (s % 2)
            name = colour_names[(2 * s + k) % 3] if k < 2 else "ball"
            arr[y:y + SIDE, x:x + SIDE] = _noise(rng, SIDE, SIDE,
                                                 COLOURS.get(name, BALL))
            true_lines.append(yolo_line([*colour_names, "ball"].index(name), x, y, SIDE, SIDE))
            if not (s == 0 and name == "ball"):
                det_lines.append(yolo_line(0 if k < 2 else 1, x, y, SIDE, SIDE, 0.9 - 0.01 * k))
                expected.append((s, (x, y), name))
        if s == 1:
            det_lines.append(yolo_line(1, 40, 36, 14, 14, 0.7))  # background: a false ball
        if s == 2:
            x, y = CELLS[0][0] + s, CELLS[0][1]
            det_lines.append(yolo_line(0, x + 1, y + 1, SIDE, SIDE, 0.6))  # NMS drops it
        if s == 3:
            det_lines += [yolo_line(1, 70, 70, 14, 14, 0.3), yolo_line(0, 80, 40, 4, 4, 0.95)]
        Image.fromarray(arr.astype(np.uint8)).save(images / f"s{s}.png")
        (detections / f"s{s}.txt").write_text("\n".join(det_lines) + "\n")
        (truth / f"s{s}.txt").write_text("\n".join(true_lines) + "\n")
    return images, detections, truth, expected


@pytest.fixture(scope="module")
def classifier(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Run id of a lenet5 trained on crops of the three colours (3 epochs, 16 px)."""
    from components.steps.params import TrainParams
    from components.steps.train import train

    data = tmp_path_factory.mktemp("crops") / "crops"
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(16):
            crop_like(data / name / f"c{i:02d}.png", rgb, seed=1000 * c + i)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        params = TrainParams(data=str(data), experiment="cascade", model="lenet5", epochs=3,
                             image_size=16, batch_size=8, num_workers=0, weights="none",
                             patience=0, augmentation="none", val_ratio=0.25, test_ratio=0.0)
        return train(params, mlflow_server, progress=False, log=lambda s: None).run_id


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cascade(*args: str):
    return CliRunner().invoke(cli, ["cascade", "--num-workers", "0", *args])


# --------------------------------------------------------------------------- pure functions


def test_yolo_and_coco_boxes_read_to_the_same_pixels(tmp_path: Path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (50, 50)).save(tmp_path / "sub" / "b.jpg")
    images = [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]
    labels = tmp_path.parent / f"{tmp_path.name}-labels"
    (labels / "sub").mkdir(parents=True)
    (labels / "data.yaml").write_text("names: {0: cup, 1: wine glass}\n")
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.4 0.8\n\n0 0.1 0.1 0.2 0.2\n")
    (labels / "sub" / "b.txt").write_text("")
    yolo = read_boxes(labels, tmp_path, images)
    assert yolo.classes == ["cup", "wine glass"]
    assert yolo.of("a.png") == [Box(80, 30, 120, 70, "wine glass", 0.8),
                                Box(0, 0, 40, 20, "cup", 1.0)]
    assert yolo.of("sub/b.jpg") == []
    coco = tmp_path.parent / f"{tmp_path.name}.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "cup"}, {"id": 3, "name": "wine glass"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [80, 30, 40, 40],
                         "score": 0.8}]}))
    read = read_boxes(coco, tmp_path, images)
    assert read.of("a.png") == yolo.of("a.png")[:1] and read.of("sub/b.jpg") == []


@pytest.mark.parametrize("content, says", [
    ("0 0.5 0.5 0.2\n", "line 1: expected `class cx cy w h [score]`, got 4 fields"),
    ("0 0.5 0.5 0.2 0.2\n0 0.5 x 0.2 0.2\n", "line 2: expected `class cx cy w h [score]` "
                                             "with an integer class and numbers"),
    ("5 0.5 0.5 0.2 0.2\n", "line 1: class 5 is not in the class list (0-1)"),
    ("0 0.5 0.5 0 0.2\n", "line 1: width and height must be > 0"),
    ("0 0.95 0.5 0.2 0.2\n", "line 1: the box reaches outside 0..1"),
    ("0 0.5 0.5 0.2 0.2 1.5\n", "line 1: score 1.5 is not in [0, 1]"),
])
def test_a_malformed_yolo_line_names_file_and_line(tmp_path: Path, content: str, says: str):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "classes.txt").write_text("cup\nglass\n")
    (labels / "a.txt").write_text(content)
    with pytest.raises(BoxesError) as err:
        read_boxes(labels, tmp_path, [tmp_path / "a.png"])
    assert str(err.value).startswith(f"{labels / 'a.txt'} {says}") and "\n" not in str(err.value)


def test_boxes_for_a_missing_image_or_without_classes_are_one_line(tmp_path: Path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(BoxesError, match="has no classes.txt or data.yaml: write classes.txt"):
        read_boxes(labels, tmp_path, [tmp_path / "a.png"])
    (labels / "classes.txt").write_text("cup\n")
    with pytest.raises(BoxesError, match=r"b\.txt has no image b\.\* in .*: remove the file"):
        read_boxes(labels, tmp_path, [tmp_path / "a.png"])
    (labels / "b.txt").unlink()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    Image.new("RGB", (10, 10)).save(tmp_path / "a.jpg")
    with pytest.raises(BoxesError, match=r"a\.txt fits 2 images \(a\.jpg, a\.png\)"):
        read_boxes(labels, tmp_path, [tmp_path / "a.jpg", tmp_path / "a.png"])
    coco = tmp_path / "boxes.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "gone.png"}],\n "categories": []')
    with pytest.raises(BoxesError, match=r"boxes\.json line 2 column \d+: not valid JSON"):
        read_boxes(coco, tmp_path, [tmp_path / "a.png"])
    coco.write_text('{"images": [{"id": 1, "file_name": "gone.png"}], "categories": [], '
                    '"annotations": []}')
    with pytest.raises(BoxesError, match=r"images\[0\]: image 'gone.png' \(id 1\) does not exist"):
        read_boxes(coco, tmp_path, [tmp_path / "a.png"])


def test_every_registered_detector_builds_and_names_its_offline_weights_file():
    for name in list_detectors():
        model = get_detector(name)(3)
        assert sum(p.numel() for p in model.parameters()) > 1_000_000, name
        with pytest.raises(DetectorError) as err:
            load_detector(name, "coco")  # the session's torch hub cache is empty: offline
        file = coco_weights_file(name)
        assert f"place {file.name} in {file.parent}/" in str(err.value), err.value
    with pytest.raises(DetectorError, match="closest: ssdlite320_mobilenet_v3_large"):
        get_detector("ssdlite320")


def test_detector_files_round_trip_and_another_architecture_is_one_line(tmp_path: Path):
    torch.manual_seed(0)
    model = get_detector(DETECTOR)(3).eval()
    path = save_detector(tmp_path / "det.pt", DETECTOR, model, ["__background__", "a", "b"])
    loaded = load_detector(DETECTOR, str(path))
    assert loaded.labels == ["a", "b"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    loaded.lower_score_threshold(0.0)
    (boxes,) = loaded.detect([image])
    assert boxes and all(b.label in ("a", "b") and 0 <= b.x1 < b.x2 <= 80 for b in boxes)
    with pytest.raises(DetectorError, match=f"holds a {DETECTOR} detector, not "
                                            "ssdlite320_mobilenet_v3_large: pass --detector"):
        load_detector("ssdlite320_mobilenet_v3_large", str(path))
    bare = tmp_path / "bare.pt"
    torch.save(get_detector("ssdlite320_mobilenet_v3_large")(91).state_dict(), bare)
    with pytest.raises(DetectorError, match=f"holds weights of another architecture, not "
                                            f"{DETECTOR} "):
        load_detector(DETECTOR, str(bare))


def test_filter_boxes_applies_threshold_size_and_nms_across_classes():
    settings = CascadeSettings(("cup",), score_threshold=0.5, iou_threshold=0.5, min_box=8)
    boxes = [Box(0, 0, 20, 20, "cup", 0.9), Box(1, 1, 21, 21, "bottle", 0.8),  # overlaps
             Box(40, 40, 60, 60, "cup", 0.4), Box(70, 70, 75, 90, "cup", 0.99),  # low, thin
             Box(30, 0, 50, 20, "cup", 0.6)]
    assert filter_boxes(boxes, settings) == [boxes[0], boxes[4]]


def test_crops_are_padded_by_the_margin_and_clamped_to_the_image():
    image = Image.fromarray(np.arange(50 * 100 * 3, dtype=np.uint8).reshape(50, 100, 3))
    padded = crop(image, Box(40, 10, 60, 30, "cup"), 0.25)  # 5 px each side
    assert np.array_equal(np.asarray(padded), np.asarray(image)[5:35, 35:65])
    assert crop(image, Box(90, 40, 100, 50, "cup"), 0.5).size == (15, 15)  # clamped


def test_a_classifier_without_an_input_size_is_one_line():
    class Stub:
        config = {"model": "x"}

    with pytest.raises(CascadeError, match="models:/m-1 does not record its input size"):
        input_sizes(Stub(), "models:/m-1")


def test_detection_metrics_count_what_pycocotools_matches():
    truth = {"a": [Box(0, 0, 10, 10, "cup"), Box(20, 20, 30, 30, "glass")],
             "b": [Box(0, 0, 10, 10, "glass")]}
    found = {"a": [Detection(Box(0, 0, 10, 10, "x", 0.9), "cup", 0.9, True),
                   Detection(Box(21, 21, 31, 31, "x", 0.9), "cup", 0.8, True)],
             "b": [Detection(Box(50, 50, 60, 60, "glass", 0.7), "glass", 0.7, False)]}
    report = detection_metrics(found, truth, ["cup", "glass"])
    m = report.metrics
    assert (m["precision50_cup"], m["recall50_cup"]) == (0.5, 1.0)
    assert (m["precision50_glass"], m["recall50_glass"]) == (0.0, 0.0)
    assert m["precision50"] == pytest.approx(1 / 3) and m["recall50"] == pytest.approx(1 / 3)
    assert m["ap50_cup"] == pytest.approx(1.0) and m["ap50_glass"] == 0.0
    assert m["map50"] == pytest.approx(0.5)
    assert report.labels == ["cup", "glass", "background"]
    # class-agnostic matches: cup->cup, glass->cup; glass in b missed; one extra glass
    assert report.confusion.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]


# --------------------------------------------------------------------------- the step


def test_cascade_with_boxes_labels_every_object_and_is_judged(tracking, scenes, classifier,
                                                              tmp_path: Path):
    images, detections, truth, expected = scenes
    out = tmp_path / "out"
    result = cascade("--images", str(images), "--boxes", str(detections), "--refine", "shape",
                     "--classifier", classifier, "--ground-truth", str(truth), "--out",
                     str(out), "--experiment", "cascade-boxes", "--annotated-artifacts", "2")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "detections.csv")
    assert list(rows[0]) == list(CASCADE_COLUMNS)
    got = {(r["image"], round(float(r["x1"])), round(float(r["y1"]))): r for r in rows}
    truth_rows = {(f"s{s}.png", x, y): name for s, (x, y), name in expected}
    assert len(rows) == len(truth_rows) + 1  # + the false ball of s1
    for key, name in truth_rows.items():
        row = got[key]
        assert row["label"] == name, (key, row)
        assert row["refined"] == str(name != "ball")
        assert row["detector_label"] == ("ball" if name == "ball" else "shape")
        if name == "ball":  # kept: the detector's label and score
            assert float(row["confidence"]) == float(row["detector_score"])
    assert got[("s1.png", 40, 36)]["label"] == "ball"
    for s in range(4):
        drawn = Image.open(out / "annotated" / f"s{s}.png")
        assert drawn.size == (SCENE, SCENE)
        assert np.asarray(drawn).tobytes() != np.asarray(Image.open(images / f"s{s}.png")
                                                         .convert("RGB")).tobytes()

    (run,) = runs_of(tracking, "cascade-boxes")
    assert run.info.status == "FINISHED" and run.info.run_name == "cascade-v1"
    m = run.data.metrics
    assert (m["n_images"], m["n_boxes"], m["n_refined"]) == (4, 12, 8)
    assert m["n_final_red"] + m["n_final_green"] + m["n_final_blue"] == 8
    for c in COLOURS:
        assert (m[f"precision50_{c}"], m[f"recall50_{c}"], m[f"ap50_{c}"]) == (1.0, 1.0, 1.0)
    assert (m["precision50_ball"], m["recall50_ball"]) == (0.75, 0.75)
    assert m["precision50"] == pytest.approx(11 / 12) and m["recall50"] == pytest.approx(11 / 12)
    assert m["map50"] == pytest.approx((3 + 76 / 101) / 4, abs=1e-4)  # COCO's 101 points
    tags = run.data.tags
    assert tags["cnnflow.step"] == "cascade" and tags["cnnflow.detector"].startswith("boxes:")
    assert tags["cnnflow.classifier_uri"].startswith("models:/")
    assert run.data.params["refine"] == "shape" and "cnnflow.cascade_model_uri" not in tags
    artifacts = {f.path for f in tracking.list_artifacts(run.info.run_id, "cascade")}
    assert {"cascade/detections.csv", "cascade/annotated"} <= artifacts
    assert len(tracking.list_artifacts(run.info.run_id, "cascade/annotated")) == 2
    local = Path(tracking.download_artifacts(run.info.run_id, "evaluation", str(tmp_path)))
    confusion = read_csv(local / "confusion.csv")
    assert [r["true"] for r in confusion] == ["blue", "green", "red", "ball", "background"]
    by_true = {r["true"]: r for r in confusion}
    assert by_true["ball"]["ball"] == "3" and by_true["ball"]["background"] == "1"
    assert by_true["background"]["ball"] == "1"
    assert sum(int(by_true[c][c]) for c in COLOURS) == 8
    assert (local / "confusion.png").is_file()


def test_bad_input_is_one_line_before_any_run(tracking, scenes, classifier, tmp_path: Path):
    images, detections, truth, _ = scenes
    out = tmp_path / "out"
    base = ["--classifier", classifier, "--out", str(out), "--experiment", "cascade-bad"]
    bad_boxes = tmp_path / "bad"
    bad_boxes.mkdir()
    (bad_boxes / "classes.txt").write_text("shape\nball\n")
    (bad_boxes / "s0.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.5 0.5 oops 0.1\n")
    ghost = tmp_path / "ghost"
    ghost.mkdir()
    (ghost / "classes.txt").write_text("shape\nball\n")
    (ghost / "s9.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    wrong_truth = tmp_path / "wrong-truth"
    wrong_truth.mkdir()
    (wrong_truth / "classes.txt").write_text("purple\n")
    ssd = tmp_path / "ssd.pt"
    save_detector(ssd, "ssdlite320_mobilenet_v3_large",
                  get_detector("ssdlite320_mobilenet_v3_large")(3), ["__background__", "a", "b"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [
        (["--images", str(images), "--boxes", str(detections), "--refine", "shapes"],
         "--refine 'shapes' is not a class of the boxes in", "close: 'shape'"),
        (["--images", str(images), "--boxes", str(bad_boxes), "--refine", "shape"],
         f"{bad_boxes / 's0.txt'} line 2: expected `class cx cy w h [score]`", ""),
        (["--images", str(images), "--boxes", str(ghost), "--refine", "shape"],
         f"{ghost / 's9.txt'} has no image s9.* in", ""),
        (["--images", str(empty), "--boxes", str(detections), "--refine", "shape"],
         "no readable images in", ""),
        (["--images", str(images), "--detector", DETECTOR, "--refine", "cup"],
         f"COCO weights for {DETECTOR} are not in the torch hub cache: place", ".pth in"),
        (["--images", str(images), "--detector", DETECTOR, "--detector-weights", str(ssd),
          "--refine", "a"], "holds a ssdlite320_mobilenet_v3_large detector, not", ""),
        (["--images", str(images), "--boxes", str(detections), "--refine", "shape",
          "--ground-truth", str(wrong_truth)], "ground truth class 'purple'", ""),
        (["--images", str(images), "--refine", "shape"], "pass exactly one of --detector", ""),
    ]
    for args, says, also in cases:
        result = cascade(*args, *base)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and also in lines[0], (args, lines)
    assert runs_of(tracking, "cascade-bad") == [] and not out.exists()
    assert not list(tmp_path.glob(".out-tmp-*"))


# --------------------------------------------------------------------------- detector + serving


@pytest.fixture(scope="module")
def detector_run(mlflow_server: str, scenes, classifier,
                 tmp_path_factory: pytest.TempPathFactory):
    """A cascade run with a randomly initialised detector (plumbing, not quality)."""
    images = scenes[0]
    folder = tmp_path_factory.mktemp("detector")
    torch.manual_seed(0)
    model = get_detector(DETECTOR)(3).eval()
    # Random features are alike for every proposal: the bias decides, shape 0.79, ball 0.11.
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    weights = save_detector(folder / "random.pt", DETECTOR, model,
                            ["__background__", "shape", "ball"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        result = cascade("--images", str(images), "--detector", DETECTOR,
                         "--detector-weights", str(weights), "--refine", "shape",
                         "--score-threshold", "0.5", "--min-box", "2", "--classifier",
                         classifier, "--out", str(folder / "out"), "--experiment",
                         "cascade-detector")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(mlflow_server)
    (run,) = runs_of(client, "cascade-detector")
    return run, folder / "out", result.output


def test_detector_path_runs_end_to_end_and_registers_the_cascade(tracking, detector_run):
    run, out, output = detector_run
    rows = read_csv(out / "detections.csv")
    assert rows and run.info.status == "FINISHED"
    refined = [r for r in rows if r["refined"] == "True"]
    assert refined == rows  # every box a `shape` (balls score 0.11: below the threshold)
    assert all(r["detector_label"] == "shape" and r["label"] in COLOURS
               and float(r["detector_score"]) >= 0.5 for r in rows)
    assert {r["image"] for r in rows} == {f"s{s}.png" for s in range(4)}
    m = run.data.metrics
    assert m["n_boxes"] == len(rows) and m["n_refined"] == len(refined)
    assert m["detector_sec"] > 0 and m["classifier_sec"] > 0
    tags = run.data.tags
    assert tags["cnnflow.detector"] == DETECTOR and tags["cnnflow.detector_weights"]
    uri = tags["cnnflow.cascade_model_uri"]
    version = tracking.get_model_version_by_alias("cascade-detector-cascade", "challenger")
    assert version.run_id == run.info.run_id and version.tags["cnnflow.detector"] == DETECTOR
    assert "registered cascade-detector-cascade v1 (@challenger)" in output
    info = mlflow.models.get_model_info(uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == list(CASCADE_COLUMNS)


def test_served_cascade_answers_a_base64_image_with_boxes_and_labels(detector_run, scenes,
                                                                     mlflow_server,
                                                                     tmp_path: Path):
    run, out, _ = detector_run
    uri = run.data.tags["cnnflow.cascade_model_uri"]
    scene = scenes[0] / "s1.png"
    encoded = base64.b64encode(scene.read_bytes()).decode("ascii")
    with serve_model(uri, mlflow_server, tmp_path / "serve.log") as url:
        response = requests.post(f"{url}/invocations", timeout=120,
                                 json={"inputs": {"image": [encoded]}})
        refused = requests.post(f"{url}/invocations", timeout=60,
                                json={"inputs": {"image": [str(scene)]}})
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    assert list(served.columns) == list(CASCADE_COLUMNS) and len(served) > 0
    assert set(served["image"]) == {0}
    assert set(served.loc[served["refined"], "label"]) <= set(COLOURS)
    assert refused.status_code == 400  # a served model never reads a server path
    written = pd.read_csv(out / "detections.csv")
    written = written[written["image"] == "s1.png"].reset_index(drop=True)
    assert list(served["label"]) == list(written["label"])
    assert np.allclose(served[["x1", "y1", "x2", "y2"]], written[["x1", "y1", "x2", "y2"]],
                       atol=1e-3)
