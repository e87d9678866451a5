"""Near-duplicates (perceptual hashes): found without comparing every pair, reported by
`cnnflow eda`, kept in one split by `cnnflow preprocess` - against a real MLflow server."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from helpers import runs_of
from PIL import Image

from components.data import near_duplicates
from components.data.images import perceptual_hash, read_file
from pipelines.cli import cli

SIZE = 64  # below ~48 px a JPEG round trip moves a pHash by 10-25 bits (docs/data.md)


def photo(seed: int) -> Image.Image:
    """Photo-like content: colour noise at four scales (a 1/f-ish spectrum), so unrelated
    pictures differ in ~128 of 256 bits and every DCT band of the hash carries signal."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((SIZE, SIZE, 3))
    for cells, weight in ((4, 1.0), (8, 0.6), (16, 0.35), (32, 0.2)):
        layer = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        acc += weight * np.asarray(layer.resize((SIZE, SIZE), Image.BICUBIC), dtype=float)
    acc = (acc - acc.min()) / (acc.max() - acc.min()) * 255
    return Image.fromarray(acc.astype(np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def resized_jpeg(img: Image.Image, path: Path) -> Path:
    """What a scraper or a re-upload makes of a picture: 3/4 size, JPEG quality 85."""
    return save(img.resize((SIZE * 3 // 4, SIZE * 3 // 4), Image.BICUBIC), path, quality=85)


def test_pigeonhole_search_finds_exactly_the_pairs_a_full_comparison_finds():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**64, (300, 4), dtype=np.uint64)
    near = base[:40].copy()
    for row in near:  # flip 1-14 random bits of 40 hashes: pairs on both sides of 8 bits
        for bit in rng.choice(256, rng.integers(1, 15), replace=False):
            row[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    bits = np.concatenate([base, near])
    a, b = np.triu_indices(len(bits), 1)
    full = near_duplicates.distances(bits, a, b)
    for threshold in (0, 3, 8, 20):
        i, j, d = near_duplicates.close_pairs(bits, threshold)
        expected = {(x, y) for x, y, z in zip(a, b, full, strict=True) if z <= threshold}
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected
        assert (d <= threshold).all()
    assert len(expected) >= 40  # at 20 bits every planted pair (1-14 bits apart) is found


def test_groups_join_chains_and_leave_exact_copies_to_the_sha1_check():
    hashes = ["00" * 32, "01" + "00" * 31, "03" + "00" * 31, "ff" * 32, "ff" * 32, ""]
    sha1s = ["a", "b", "c", "d", "e", "f"]
    chain, same_hash = near_duplicates.groups(hashes, sha1s, max_distance=1)
    assert chain.members == (0, 1, 2) and chain.max_distance == 2  # 0~1~2, 0 and 2: 2 bits
    assert same_hash.members == (3, 4) and same_hash.max_distance == 0  # different bytes
    copies = near_duplicates.groups(hashes, ["a", "b", "c", "d", "d", "f"], max_distance=1)
    assert [g.members for g in copies] == [(0, 1, 2)]  # 3 and 4: one file twice, not near
    assert near_duplicates.groups(hashes, sha1s, max_distance=0) == []  # 0 = off


def test_the_hash_is_imagehash_phash_without_its_resize_when_the_image_is_large():
    import imagehash

    def reference(img: Image.Image) -> str:
        bits = imagehash.phash(img.convert("L"), hash_size=16).hash
        return np.packbits(bits.ravel()).tobytes().hex()

    small, large = photo(5).resize((48, 40)), photo(5).resize((300, 200), Image.BICUBIC)
    assert near_duplicates.hamming(perceptual_hash(small), reference(small)) <= 1
    assert near_duplicates.hamming(perceptual_hash(large), reference(large)) <= 8
    assert near_duplicates.hamming(perceptual_hash(large), perceptual_hash(photo(6))) > 64


def test_eda_and_preprocess_agree_on_the_hash_whatever_they_decode(tmp_path):
    big = save(photo(1).resize((400, 300), Image.BICUBIC), tmp_path / "big.jpg", quality=90)
    eda_like = read_file(big, histogram=True, phash=True)
    cached = read_file(big, cache_size=32, phash=True)
    checked = read_file(big, phash=True)
    assert eda_like.phash == cached.phash == checked.phash and len(eda_like.phash) == 64
    plain = read_file(big, cache_size=32)  # the drafted decode must not leak into the cache
    assert np.array_equal(plain.pixels, cached.pixels)


def test_a_resized_jpeg_copy_across_splits_and_classes_is_found_and_kept_in_one_split(
        tracking, tmp_path):
    root = tmp_path / "shop"
    seed = 100
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                seed += 1
                save(photo(seed), root / split / cls / f"{i}.png")
    original = photo(1)
    save(original, root / "train" / "cat" / "original.png")
    resized_jpeg(original, root / "val" / "cat" / "reupload.jpg")  # leakage
    twin = photo(2)
    save(twin, root / "train" / "cat" / "twin.png")
    save(twin, root / "train" / "dog" / "twin.jpg", quality=90)  # one picture, two labels

    reports = tmp_path / "reports"
    result = CliRunner().invoke(cli, ["eda", "--data", str(root), "--experiment", "nd",
                                      "--reports-dir", str(reports), "--num-workers", "0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "nd", "eda")
    m = run.data.metrics
    assert (m["n_near_duplicate_groups"], m["n_near_dup_cross_split"],
            m["n_near_dup_label_conflicts"], m["n_near_dup_within_class"]) == (2, 1, 1, 1)
    assert run.data.params["near_dup_distance"] == "12"
    report = (reports / "eda" / "shop" / "report.md").read_text()
    assert "1 group of near-identical pictures appears under more than one class (e.g. " \
           "`train/cat/twin.png` and `train/dog/twin.jpg`)" in report
    assert "1 group of near-identical pictures (resized, recompressed or edited copies) " \
           "spans more than one split (e.g. `train/cat/original.png` and " \
           "`val/cat/reupload.jpg`;" in report
    assert "| 1 | cat, dog | train |" in report and "| 2 | cat | train, val |" in report
    assert "](near_duplicates.png)" in report and (reports / "eda" / "shop" /
                                                   "near_duplicates.png").is_file()

    result = CliRunner().invoke(cli, ["preprocess", "--data", str(root), "--experiment", "nd",
                                      "--num-workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (prep,) = runs_of(tracking, "nd", "preprocess")
    assert prep.data.metrics["n_near_dup_moved"] == prep.data.metrics["n_leakage_moved"] == 1
    assert prep.data.metrics["n_label_conflicts_excluded"] == 0  # different bytes: kept
    data = Path(tracking.download_artifacts(prep.info.run_id, "data", str(tmp_path / "dl")))
    with open(data / "manifest.csv", newline="") as fh:
        split_of = {r["path"]: r["split"] for r in csv.DictReader(fh)}
    assert split_of["train/cat/original.png"] == split_of["val/cat/reupload.jpg"] == "val"
    assert split_of["train/cat/twin.png"] == split_of["train/dog/twin.jpg"] == "train"
    # Unrelated pictures stay where the folder put them.
    assert all(split_of[p] == p.split("/")[0] for p in split_of if "original" not in p)
    with open(data / "leakage_moved.csv", newline="") as fh:
        (moved,) = csv.DictReader(fh)
    assert (moved["path"], moved["from_split"], moved["to_split"], moved["reason"]) == (
        "train/cat/original.png", "train", "val", "near-duplicate")
    assert 0 < int(moved["distance"]) <= 12
