"""components.data.datasets on real image files in temporary folders (no mocks)."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image
from PIL import Image

from components.data import datasets as D
from components.data.datasets import DataError


def _paths(samples):
    return [p for p, _ in samples]


def _assert_one_line_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# ----------------------------------------------------------------------------- splits


def test_flat_split_is_stratified_and_reproducible(image_folder):
    root = image_folder({"red": 10, "green": 10, "blue": 10})
    a = D.load_splits(root, val_ratio=0.2, test_ratio=0.2, seed=1)
    assert a.classes == ["blue", "green", "red"] and not a.presplit and a.name == root.name
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        assert a.counts()[split] == {"blue": n, "green": n, "red": n}
    everything = _paths(a.train) + _paths(a.val) + _paths(a.test)
    assert len(set(everything)) == 30 and all(os.path.isabs(p) for p in everything)
    for path, label in a.train + a.val + a.test:
        assert Path(path).parent.name == a.classes[label]

    b = D.load_splits(str(root), val_ratio=0.2, test_ratio=0.2, seed=1)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.digest() == b.digest()
    c = D.load_splits(root, val_ratio=0.2, test_ratio=0.2, seed=2)
    assert set(_paths(c.test)) != set(_paths(a.test))
    assert c.digest() != a.digest()


def test_small_class_still_gets_val_and_test(image_folder):
    s = D.load_splits(image_folder({"a": 3, "b": 20}), 0.1, 0.1)
    assert s.counts()["train"]["a"] == 1
    assert s.counts()["val"]["a"] == 1 and s.counts()["test"]["a"] == 1
    none = D.load_splits(image_folder({"a": 3, "b": 4}), 0.0, 0.0)
    assert len(none.train) == 7 and none.val == [] and none.test == []


def test_presplit_layout_is_kept(image_folder):
    root = image_folder({"red": 6, "green": 6}, layout="split")
    s = D.load_splits(root)
    assert s.presplit and s.classes == ["green", "red"]
    assert {split: sum(c.values()) for split, c in s.counts().items()} == {
        "train": 12, "val": 4, "test": 4}
    for split in D.SPLITS:
        assert all(s.relpath(p).startswith(f"{split}/") for p in _paths(s.split(split)))
    assert s.notes == []


def test_presplit_without_test_carves_it_from_train(image_folder):
    root = image_folder({"red": 10, "green": 10}, layout="split")
    shutil.rmtree(root / "test")
    s = D.load_splits(root, test_ratio=0.2)
    assert s.counts()["test"] == {"green": 2, "red": 2}
    assert s.counts()["train"] == {"green": 8, "red": 8}
    assert all(s.relpath(p).startswith("train/") for p in _paths(s.test))
    assert not set(_paths(s.test)) & set(_paths(s.train))
    assert any("test" in note for note in s.notes)
    assert D.load_splits(root, test_ratio=0.0).test == []


def test_extensions_case_insensitive_hidden_ignored(image_folder):
    root = image_folder({"a": 2, "b": 2})
    write_image(root / "a" / "UPPER.PNG", (10, 10, 10))
    write_image(root / "b" / "Mixed.JpG", (10, 10, 10))
    write_image(root / "b" / "nested" / "deep.Jpeg", (10, 10, 10))
    write_image(root / "a" / ".hidden.png", (10, 10, 10))
    write_image(root / "a" / ".thumbs" / "x.png", (10, 10, 10))
    write_image(root / ".cache" / "y.png", (10, 10, 10))
    s = D.load_splits(root, 0.0, 0.0)
    names = sorted(Path(p).name for p in _paths(s.train))
    assert "UPPER.PNG" in names and "Mixed.JpG" in names and "deep.Jpeg" in names
    assert len(names) == 7 and s.classes == ["a", "b"]
    assert not any("hidden" in p or ".thumbs" in p or ".cache" in p
                   for p in names + [p for p, _ in s.skipped])
    assert s.skipped == []


def test_non_image_files_are_reported(image_folder):
    root = image_folder({"a": 3, "b": 3})
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("about this dataset")
    s = D.load_splits(root)
    reasons = {Path(p).name: r for p, r in s.skipped}
    assert reasons == {"notes.txt": "not an image extension", "README.md": "not in a class folder"}
    assert len(s.train) + len(s.val) + len(s.test) == 6


def test_corrupt_and_truncated_files_are_skipped(image_folder):
    root = image_folder({"a": 4, "b": 4})
    (root / "a" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    png = write_image(root / "b" / "trunc.png", (1, 2, 3), size=64)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    jpg = write_image(root / "b" / "trunc.jpg", (1, 2, 3), size=64)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    s = D.load_splits(root)
    reasons = {Path(p).name: r for p, r in s.skipped}
    assert set(reasons) == {"random.jpg", "trunc.png", "trunc.jpg"}
    assert all(r.startswith("cannot decode image") and "\n" not in r for r in reasons.values())
    kept = _paths(s.train) + _paths(s.val) + _paths(s.test)
    assert len(kept) == 8
    loader = D.make_loaders(D.load_splits(root, 0.0, 0.0), 16, 4, num_workers=0)["train"]
    assert sum(len(y) for _, y in loader) == 8

    unverified = D.load_splits(root, 0.0, 0.0, verify=False)
    assert len(unverified.train) == 11 and len(unverified.skipped) == 0


def test_image_modes_load_as_rgb_tensors(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent -> white
    palette_t = Image.new("P", (16, 16), 0)
    palette_t.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_t.info["transparency"] = 0
    images = {
        "gray.png": Image.new("L", (16, 16), 128),
        "pal.gif": Image.new("RGB", (16, 16), (0, 200, 0)).convert("P"),
        "pal_transparent.png": palette_t,
        "rgba.png": rgba,
        "la.png": Image.new("LA", (16, 16), (50, 255)),
        "gray16.png": Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)),
        "cmyk.tiff": Image.new("CMYK", (16, 16), (0, 255, 0, 0)),
        "one_bit.bmp": Image.new("1", (16, 16), 1),
    }
    samples = []
    for name, img in images.items():
        img.save(tmp_path / name)
        samples.append((str(tmp_path / name), 0))
    tf = D.build_transform("none", 12, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    ds = D.ImageDataset(samples, tf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {name: ds[i] for i, name in enumerate(images)}
    for x, label in out.values():
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and label == 0
    assert torch.allclose(out["rgba.png"][0], torch.ones(3, 12, 12))
    assert torch.allclose(out["pal_transparent.png"][0], torch.ones(3, 12, 12))
    assert 0.55 < out["gray16.png"][0].mean() < 0.65  # 40000/65535, not clipped to white


# ----------------------------------------------------------------------------- errors


def _write_class(root: Path, name: str, n: int = 3) -> None:
    for i in range(n):
        write_image(root / name / f"{i}.png", (i * 40, 0, 0), seed=i)


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_splits(tmp_path / "nope")
    _assert_one_line_error(e, "nope", "does not exist")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        D.resolve_data(str(tmp_path / "file.png"))
    _assert_one_line_error(e, "file.png", "not a directory")


def test_no_class_folders(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        D.load_splits(tmp_path)
    _assert_one_line_error(e, "no class folders")


def test_empty_class_folder(tmp_path):
    _write_class(tmp_path, "cats")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("only text")
    with pytest.raises(DataError) as e:
        D.load_splits(tmp_path)
    _assert_one_line_error(e, "'dogs'", "empty")


def test_one_class_only(tmp_path):
    _write_class(tmp_path, "cats")
    with pytest.raises(DataError) as e:
        D.load_splits(tmp_path)
    _assert_one_line_error(e, "'cats'", "at least two")


def test_presplit_val_with_different_classes(tmp_path):
    for cls in ("cats", "dogs"):
        _write_class(tmp_path / "train", cls)
    for cls in ("cats", "birds"):
        _write_class(tmp_path / "val", cls)
    with pytest.raises(DataError) as e:
        D.load_splits(tmp_path)
    _assert_one_line_error(e, "missing dogs", "extra birds", "val")


@pytest.mark.parametrize(("val", "test", "needle"), [
    (-0.1, 0.2, "val_ratio"), (0.2, 1.0, "test_ratio"), (0.5, 0.5, "val_ratio + test_ratio")])
def test_bad_ratios(image_folder, val, test, needle):
    root = image_folder({"a": 3, "b": 3})
    with pytest.raises(DataError) as e:
        D.load_splits(root, val_ratio=val, test_ratio=test)
    _assert_one_line_error(e, needle)


def test_unknown_augmentation():
    with pytest.raises(DataError) as e:
        D.build_transform("wild", 16, train=True, mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD)
    _assert_one_line_error(e, "'wild'", "none", "light", "strong")


def test_unknown_class_weight_mode(image_folder):
    with pytest.raises(DataError) as e:
        D.class_weights(D.load_splits(image_folder({"a": 3, "b": 3})), "inverse")
    _assert_one_line_error(e, "'inverse'", "balanced")


# ----------------------------------------------------------------------------- digits


def test_digits_generated_once_atomically_and_concurrently(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    stale = cache / ".digits-tmp-stale"
    stale.mkdir(parents=True)
    (stale / "half-written.png").write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    results, errors = [], []

    def first_use() -> None:
        try:
            results.append(D.ensure_digits(cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [cache / "digits"] * 2
    root = results[0]
    classes = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert classes == [str(i) for i in range(10)]
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(root / "0" / "0.png") as img:
        assert img.mode == "L" and img.size == (32, 32)
    assert [p.name for p in cache.iterdir()] == ["digits"]  # stale and losing temp folders gone

    mtime = files[0].stat().st_mtime_ns
    start = time.perf_counter()
    assert D.ensure_digits(cache) == root
    assert time.perf_counter() - start < 0.1 and files[0].stat().st_mtime_ns == mtime

    monkeypatch.setenv("CNNFLOW_DATA_DIR", str(cache))
    assert D.resolve_data("digits") == ("digits", root)
    s = D.load_splits("digits")
    assert s.name == "digits" and len(s.classes) == 10 and s.skipped == []
    assert len(s.train) + len(s.val) + len(s.test) == 1797


# ----------------------------------------------------------------------------- digest, manifest


def test_digest_stable_across_copies_and_changes_on_add(image_folder, tmp_path):
    root = image_folder({"a": 5, "b": 5})
    first = D.load_splits(root).digest()
    assert D.load_splits(root).digest() == first
    copy = tmp_path / "elsewhere" / root.name
    shutil.copytree(root, copy)
    assert D.load_splits(copy).digest() == first  # same folder on another machine/path
    write_image(root / "a" / "new.png", (1, 1, 1))
    assert D.load_splits(root).digest() != first


def test_digest_is_over_pixels_not_file_names(tmp_path):
    """Two folders with the same relative names but other pixels are different datasets."""
    a = tmp_path / "a" / "data"
    b = tmp_path / "b" / "data"
    for i in range(5):
        for ci, cls in enumerate(("cat", "dog")):
            write_image(a / cls / f"{i}.png", (200 * ci, 50, 50), seed=i)
            write_image(b / cls / f"{i}.png", (200 * ci, 50, 50), seed=100 + i)
    sa, sb = D.load_splits(a), D.load_splits(b)
    assert [D.load_splits(a).relpath(p) for p in _paths(sa.train)] == \
        [sb.relpath(p) for p in _paths(sb.train)]  # same names, same split
    assert sa.digest() != sb.digest()

    elsewhere = tmp_path / "copied" / "under" / "another-name"
    shutil.copytree(a, elsewhere)
    assert D.load_splits(elsewhere).digest() == sa.digest()  # the folder path is not hashed

    target = a / "dog" / "3.png"
    with Image.open(target) as img:
        pixels = np.asarray(img).copy()
    pixels[0, 0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(pixels, "RGB").save(target)
    assert D.load_splits(a).digest() != sa.digest()


def test_digest_of_an_unscanned_split_reads_the_files_once(image_folder):
    """Splits built without a scan (verify=False) hash on first use, to the same digest."""
    root = image_folder({"a": 5, "b": 5})
    scanned = D.load_splits(root)
    lazy = D.load_splits(root, verify=False)
    assert lazy.hashes == {}
    assert lazy.digest() == scanned.digest()
    assert lazy.hashes == scanned.hashes
    gone = D.load_splits(root, verify=False)
    Path(gone.train[0][0]).unlink()  # deleted between the listing and the digest
    with pytest.raises(DataError) as excinfo:
        gone.digest()
    _assert_one_line_error(excinfo, "cannot read", "restore the file")


def test_manifest_rows(image_folder):
    s = D.load_splits(image_folder({"a": 5, "b": 5}))
    rows = s.manifest_rows()
    assert len(rows) == 10
    assert set(rows[0]) == {"path", "label", "class_index", "split", "sha1"}
    for row in rows:
        assert not os.path.isabs(row["path"]) and "\\" not in row["path"]
        assert s.classes[row["class_index"]] == row["label"] == row["path"].split("/")[0]
        assert row["sha1"] == hashlib.sha1((s.root / row["path"]).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- EXIF orientation


def write_rotated_jpeg(path: Path, orientation: int = 6) -> Image.Image:
    """A 24x12 JPEG stored sideways with an EXIF Orientation tag; returns the stored pixels."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (12, 24, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        stored.load()
        return stored.copy()


def test_exif_orientation_is_applied_wherever_an_image_is_decoded(tmp_path):
    from components.data.images import read_file, resize_square
    from components.serving.classifier import to_pil

    path = tmp_path / "phone.jpg"
    stored = write_rotated_jpeg(path)
    assert stored.size == (24, 12)
    # What orientation 6 means, as plain pixels (a transposed copy would keep the tag).
    shown = Image.fromarray(np.asarray(stored.transpose(Image.Transpose.ROTATE_270)), "RGB")
    loaded = D.load_rgb(path)  # training and evaluation
    assert loaded.size == (12, 24)
    assert np.array_equal(np.asarray(loaded), np.asarray(shown))
    for item in (str(path), path.read_bytes(), Image.open(path)):  # serving
        assert np.array_equal(np.asarray(to_pil(item)), np.asarray(shown))
    facts = read_file(path, cache_size=8)  # preprocess tensor cache, eda facts
    assert (facts.width, facts.height, facts.orientation, facts.rotated) == (12, 24, 6, True)
    assert np.array_equal(facts.pixels, np.asarray(resize_square(shown, 8)))
    tensor = D.build_transform("none", 16, train=False)(Image.open(path))
    assert torch.equal(tensor, D.build_transform("none", 16, train=False)(shown))
    upright = tmp_path / "upright.png"
    write_image(upright, (1, 2, 3))
    assert read_file(upright).orientation == 1 and not read_file(upright).rotated


# ----------------------------------------------------------------------------- transforms, loaders


def test_eval_transform_is_deterministic_and_train_augments(tmp_path):
    img = D.load_rgb(write_image(tmp_path / "x.png", (120, 60, 30), size=16))
    ev = D.build_transform("strong", 16, train=False, mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD)
    assert torch.equal(ev(img), ev(img))
    tr = D.build_transform("strong", 16, train=True, mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(3)]
    assert outs[0].shape == (3, 16, 16) and not torch.equal(outs[0], outs[1])
    assert D.list_augmentations() == ["light", "none", "strong"]


def test_registering_a_preset_is_one_decorator(tmp_path):
    from torchvision import transforms as T

    @D.register_augmentation("test-gray")
    def _gray(image_size: int) -> D.Augmentation:
        return D.Augmentation(pil=[T.Grayscale(num_output_channels=3)])

    try:
        assert "test-gray" in D.list_augmentations()
        img = D.load_rgb(write_image(tmp_path / "x.png", (200, 0, 0)))
        x = D.build_transform("test-gray", 8, True, (0, 0, 0), (1, 1, 1))(img)
        assert torch.allclose(x[0], x[1])
    finally:
        D.AUGMENTATIONS.pop("test-gray")


def test_loaders_shapes_and_reproducible_train_order(image_folder):
    s = D.load_splits(image_folder({"a": 10, "b": 10}), 0.2, 0.0)
    loaders = D.make_loaders(s, image_size=12, batch_size=4, augmentation="light",
                             num_workers=0, seed=7)
    assert loaders["test"] is None and set(loaders) == {"train", "val", "test"}
    x, y = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert loaders["train"].drop_last and not loaders["val"].drop_last
    assert sum(len(y) for _, y in loaders["val"]) == len(s.val)

    def order(seed: int, workers: int = 0) -> list[int]:
        loader = D.make_loaders(s, 12, 4, num_workers=workers, seed=seed)["train"]
        return [int(i) for i in loader.batch_sampler.sampler]  # same sampler the batches use

    def labels(seed: int, workers: int) -> list[int]:
        loader = D.make_loaders(s, 12, 4, augmentation="strong", num_workers=workers,
                                seed=seed)["train"]
        return [int(v) for _, y in loader for v in y]

    assert order(7) == order(7) and order(7) != order(8)
    assert labels(3, 2) == labels(3, 0)  # worker processes keep the seeded order


def test_small_train_set_keeps_its_only_batch(image_folder):
    s = D.load_splits(image_folder({"a": 3, "b": 3}), 0.0, 0.0)
    train = D.make_loaders(s, 8, batch_size=32, num_workers=2)["train"]
    assert not train.drop_last and train.num_workers == 1 and train.persistent_workers
    assert [len(y) for _, y in train] == [6]
    assert not train.pin_memory
    assert D.make_loaders(s, 8, 32, num_workers=0, device_type="cuda")["train"].pin_memory


def test_class_weights_balanced_favours_small_class(image_folder):
    s = D.load_splits(image_folder({"big": 12, "small": 4}), 0.0, 0.0)
    assert D.class_weights(s, "none") is None
    w = D.class_weights(s, "balanced")
    big, small = s.classes.index("big"), s.classes.index("small")
    assert w.dtype == torch.float32 and w[small] > w[big]
    expected = torch.zeros(2)
    expected[big], expected[small] = 16 / (2 * 12), 16 / (2 * 4)  # sklearn's "balanced"
    assert torch.allclose(w, expected)
