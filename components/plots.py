"""Figures logged with runs. Matplotlib's Agg backend: no display is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    """Every figure is written the same way and closed at once (a report draws dozens)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Train vs. validation loss and accuracy per epoch: the overfitting check the seeds did."""
    sns.set_theme(style="whitegrid")
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.legend()
    return _save(fig, path)


def plot_curves_all(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Every model's loss and accuracy per epoch in one figure (one colour per model, val
    solid, train dashed): which model learns faster, which one overfits, at a glance."""
    sns.set_theme(style="whitegrid")
    colours = dict(zip(histories, sns.color_palette("tab10", max(1, len(histories))),
                       strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for model, history in histories.items():
            epochs = [h["epoch"] for h in history]
            for split, style in (("val", "-"), ("train", "--")):
                key = f"{split}_{metric}"
                if history and all(key in h for h in history):
                    ax.plot(epochs, [h[key] for h in history], style, marker="o",
                            markersize=3, color=colours[model], label=f"{model} {split}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle("training curves of every model")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Evaluation figures (steps/evaluate.py)
# --------------------------------------------------------------------------------------------


def _class_axis_size(n: int) -> float:
    """Figure side that keeps class names readable from 2 to a few hundred classes."""
    return min(4.0 + 0.45 * n, 40.0)


def plot_confusion_matrix(matrix, classes: list[str], path: Path,
                          normalize: bool = False) -> Path:
    """Counts (or rows normalised to 1: per-class recall) as a seaborn heatmap."""
    import numpy as np

    matrix = np.asarray(matrix, dtype=float)
    if normalize:
        sums = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)
    n = len(classes)
    side = _class_axis_size(n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    sns.heatmap(matrix, annot=n <= 25, fmt=".2f" if normalize else ".0f", cmap="Blues",
                xticklabels=classes, yticklabels=classes, vmin=0,
                vmax=1 if normalize else None, square=True, cbar=True, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (normalised per true class)" if normalize else ""))
    return _save(fig, path)


def plot_per_class_accuracy(per_class: list[dict], path: Path) -> Path:
    """One bar per class (accuracy, with the image count on top): where the model struggles."""
    sns.set_theme(style="whitegrid")
    names = [row["class"] for row in per_class]
    accs = [row["accuracy"] or 0.0 for row in per_class]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), accs, color=sns.color_palette("viridis", len(names)))
    for bar, row in zip(bars, per_class, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"n={row['count']}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("per-class accuracy")
    return _save(fig, path)


def _image_grid(tiles: list[tuple[str | Path, str]], path: Path, *, columns: int,
                cell: tuple[float, float], title: str, empty: str, fontsize: int) -> Path:
    """Images with a caption each, `columns` wide; `empty` says why there are none. An image
    not on this machine is drawn as a note (a logged path from another computer)."""
    from components.data.datasets import load_rgb

    if not tiles:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        return _save(fig, path)
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, caption) in zip(axes.ravel(), tiles, strict=False):
        if Path(image).is_file():
            ax.imshow(load_rgb(image))
        else:
            ax.text(0.5, 0.5, "image not\non this machine", ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
        ax.set_title(caption, fontsize=fontsize, color="firebrick")
    fig.suptitle(title)
    return _save(fig, path)


def plot_misclassified(items: list[tuple[str, str, str, float]], path: Path,
                       columns: int = 4) -> Path:
    """The most confidently wrong images: (path, true label, predicted label, confidence)."""
    tiles = [(image, f"true: {true}\npred: {pred} ({conf:.0%})")
             for image, true, pred, conf in items]
    return _image_grid(tiles, path, columns=columns, cell=(3, 3.3),
                       title="most confident mistakes", empty="no misclassified images",
                       fontsize=9)


def plot_label_issues(items: list[tuple[Path, str, str, float]], path: Path,
                      columns: int = 6) -> Path:
    """Likely mislabelled images, most suspicious first: (image file, given label, suggested
    label, label quality score)."""
    tiles = []
    for rank, (image, given, suggested, score) in enumerate(items, start=1):
        name = Path(image).name
        name = name if len(name) <= 24 else f"...{name[-21:]}"
        tiles.append((image, f"#{rank} {name}\n{given} -> {suggested}, quality {score:.3f}"))
    return _image_grid(tiles, path, columns=columns, cell=(2.4, 2.8),
                       title="likely label issues (given -> suggested; low quality = "
                             "suspicious)", empty="no likely label issues", fontsize=8)


def plot_reliability(bins: list[dict], ece: float, path: Path) -> Path:
    """Accuracy vs. confidence per bin against the diagonal: is the model over-confident?"""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width,
           align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar([b["lower"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled],
           bottom=[b["accuracy"] for b in filled], width=width, align="edge", color="salmon",
           alpha=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float],
                 suggestion: float, path: Path) -> Path:
    """The LR range test: loss per batch against the LR (log axis), the smoothed curve, and
    the suggested LR (steepest descent) marked."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="lightgray", linewidth=1, label="loss per batch")
    ax.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
    at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - suggestion))
    ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1)
    ax.plot([suggestion], [smoothed[at]], "o", color="C3", markersize=8,
            label=f"suggested lr {suggestion:.2e}")
    ax.set_xscale("log")
    top = max(smoothed[0], min(smoothed) * 4) if smoothed else 1
    ax.set_ylim(min(min(losses), min(smoothed)) * 0.9, top * 1.1)
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# EDA figures: readable on GitHub next to report.md
# --------------------------------------------------------------------------------------------

_SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868", "all": "#8172B3",
                  "unassigned": "#937860"}


def plot_class_counts(counts: dict[str, dict[str, int]], path: Path) -> Path:
    """Images per class, one bar per split side by side: imbalance and thin splits at a glance.

    `counts` is split -> class -> images, as `DatasetSplits.counts()` returns it.
    """
    import pandas as pd

    sns.set_theme(style="whitegrid")
    rows = [{"class": cls, "split": split, "images": n}
            for split, per_class in counts.items() for cls, n in per_class.items()]
    frame = pd.DataFrame(rows)
    n_classes = frame["class"].nunique()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n_classes * max(1, len(counts))), 4))
    sns.barplot(frame, x="class", y="images", hue="split", ax=ax,
                palette={s: _SPLIT_COLOURS.get(s, "#999999") for s in counts})
    ax.set_title("images per class and split")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="split")
    if n_classes > 8:
        ax.tick_params(axis="x", rotation=60)
    return _save(fig, path)


def plot_image_sizes(sizes: list[tuple[int, int]], path: Path) -> Path:
    """Width x height of every image, marker area by count: one dot means one size."""
    from collections import Counter

    import pandas as pd

    sns.set_theme(style="whitegrid")
    counted = Counter(sizes)
    frame = pd.DataFrame([{"width": w, "height": h, "images": n}
                          for (w, h), n in counted.items()])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.scatterplot(frame, x="width", y="height", size="images", sizes=(30, 400),
                    ax=axes[0], legend="brief", alpha=0.7)
    axes[0].set_title(f"image sizes ({len(counted)} distinct)")
    long = pd.DataFrame({"pixels": [w for w, _ in sizes] + [h for _, h in sizes],
                         "side": ["width"] * len(sizes) + ["height"] * len(sizes)})
    sns.histplot(long, x="pixels", hue="side", ax=axes[1], element="step", discrete=False)
    axes[1].set_title("width and height")
    return _save(fig, path)


def plot_rgb_histograms(histograms: dict[str, Any], path: Path, max_classes: int = 30) -> Path:
    """Mean per-class R, G, B histograms (class -> (3, 256) array, each channel summing to 1).

    Classes that differ mostly by colour show up here; so do washed-out or dark classes.
    """
    import numpy as np
    import pandas as pd

    sns.set_theme(style="whitegrid")
    names = list(histograms)[:max_classes]
    cols = min(4, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for ax, name in zip(axes.flat, names, strict=False):
        hist = np.asarray(histograms[name])
        frame = pd.DataFrame({"value": np.tile(np.arange(hist.shape[1]), 3),
                              "share": hist.reshape(-1),
                              "channel": np.repeat(["R", "G", "B"], hist.shape[1])})
        sns.lineplot(frame, x="value", y="share", hue="channel", ax=ax, legend=False,
                     palette={"R": "#d62728", "G": "#2ca02c", "B": "#1f77b4"}, linewidth=1)
        ax.set_title(str(name))
        ax.set_xlabel("")
        ax.set_ylabel("")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("mean RGB histogram per class (pixel share per value 0-255)")
    return _save(fig, path)


def plot_sample_grid(samples: dict[str, list[Any]], path: Path) -> Path:
    """A row of example images (PIL, RGB) per class: the check that labels look right."""
    names = list(samples)
    cols = max([len(v) for v in samples.values()] + [1])
    fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols + 1.2, 1.3 * len(names)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(samples[name]):
                ax.imshow(samples[name][c])
            if c == 0:
                ax.set_ylabel(str(name), rotation=0, ha="right", va="center")
    return _save(fig, path)


def plot_near_duplicates(groups: list[tuple[str, list[tuple[Any, str]]]], path: Path) -> Path:
    """One row per near-duplicate group: its title above, thumbnails (RGB arrays) with a
    caption each (eda: class / split), so a reader sees at once what was matched."""
    cols = max([len(items) for _, items in groups] + [1])
    fig = plt.figure(figsize=(1.7 * cols + 0.3, 2.2 * len(groups)))
    grid = fig.add_gridspec(2 * len(groups), cols, height_ratios=[0.18, 1] * len(groups))
    for r, (title, items) in enumerate(groups):
        head = fig.add_subplot(grid[2 * r, :])
        head.axis("off")
        head.text(0.0, 0.0, title, fontsize=9, fontweight="bold", va="bottom")
        for c, (image, caption) in enumerate(items):
            ax = fig.add_subplot(grid[2 * r + 1, c])
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Experiment report figures (steps/report.py)
# --------------------------------------------------------------------------------------------

COST_METRICS = (("latency_ms_p50", "latency p50 (ms)"), ("model_size_mb", "model size (MB)"),
                ("params_count", "parameters"))


def plot_cost(rows: list[dict[str, Any]], path: Path) -> Path:
    """Latency p50, model size and parameter count per model side by side: what accuracy costs.

    `rows` hold `run` plus the metrics of COST_METRICS (None where a run has no value: an
    empty bar slot, so every panel lists the same models in the same order).
    """
    sns.set_theme(style="whitegrid")
    names = [str(r["run"]) for r in rows]
    colours = sns.color_palette("viridis", max(1, len(names)))
    fig, axes = plt.subplots(1, len(COST_METRICS),
                             figsize=(max(10.0, 1.1 * len(names) * len(COST_METRICS)), 4))
    for ax, (metric, label) in zip(axes, COST_METRICS, strict=True):
        values = [r.get(metric) for r in rows]
        ax.bar(range(len(names)), [v or 0.0 for v in values], color=colours)
        for i, v in enumerate(values):
            text = "n/a" if v is None else (f"{v:,.0f}" if metric == "params_count"
                                            else f"{v:.3g}")
            ax.text(i, v or 0.0, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 2 else 0,
                      ha="right" if len(names) > 2 else "center")
        ax.set_title(label)
    fig.suptitle("cost per model (lower is cheaper)")
    return _save(fig, path)


# --------------------------------------------------------------------------- Grad-CAM


def cam_overlay(image: Any, cam: Any, max_side: int = 160, alpha: float = 0.45) -> Any:
    """An RGB image (PIL) with a Grad-CAM map (H x W in [0, 1], any size) laid over it in the
    `jet` colours, shrunk to at most `max_side` px: an HxWx3 uint8 array.

    The map covers the whole image: the model's input is the image resized to a square, so
    stretching the map back to the image's own shape puts each cell where it looked.
    """
    import numpy as np
    from PIL import Image

    img = image.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    heat = Image.fromarray((np.clip(np.asarray(cam, dtype=np.float32), 0, 1) * 255)
                           .astype(np.uint8)).resize(img.size, Image.BILINEAR)
    colours = plt.get_cmap("jet")(np.asarray(heat) / 255.0)[..., :3] * 255
    blended = (1 - alpha) * np.asarray(img, dtype=np.float32) + alpha * colours
    return blended.clip(0, 255).astype(np.uint8)


def cam_tile(image: Any, cam: Any, caption: str, correct: bool = True, side: int = 160) -> Any:
    """One Grad-CAM overlay as a PIL image, `side` px on its long side, with a caption band
    below (wrong predictions in red). Drawn with PIL, no matplotlib figure: a gallery of
    many images stays cheap (evaluate draws one on every run)."""
    from PIL import Image, ImageDraw, ImageFont

    overlay = Image.fromarray(cam_overlay(image, cam, max_side=side))
    scale = side / max(overlay.size)
    overlay = overlay.resize((max(1, round(overlay.width * scale)),
                              max(1, round(overlay.height * scale))), Image.NEAREST)
    lines = caption.splitlines() or [""]
    tile = Image.new("RGB", (side, side + 14 * len(lines) + 6), "white")
    tile.paste(overlay, ((side - overlay.width) // 2, (side - overlay.height) // 2))
    draw, font = ImageDraw.Draw(tile), ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((4, side + 3 + 14 * i), line, font=font,
                  fill=(0, 0, 0) if correct else (178, 34, 34))
    return tile


def save_cam_sheet(tiles: list[Any], path: Path, title: str = "", columns: int = 8,
                   gap: int = 6) -> Path:
    """`cam_tile`s in a grid under a title line, as one PNG (evaluate's overview)."""
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        tiles = [Image.new("RGB", (160, 40), "white")]
        ImageDraw.Draw(tiles[0]).text((4, 14), "no images to explain", fill=(0, 0, 0))
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    top = 22 if title else 0
    sheet = Image.new("RGB", (cols * w + (cols + 1) * gap, top + rows * h + (rows + 1) * gap),
                      "white")
    if title:
        ImageDraw.Draw(sheet).text((gap, 6), title, font=ImageFont.load_default(),
                                   fill=(0, 0, 0))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet.paste(tile, (gap + c * (w + gap), top + gap + r * (h + gap)))
    sheet.save(path)
    return path


def plot_cam_panels(image: Any, panels: list[tuple[str, Any]], path: Path, title: str = "",
                    cell: float = 2.6) -> Path:
    """One image side by side: the photo itself, then one overlay per (name, map), e.g. the
    model's map and, for an ensemble, each member's."""
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(cell * (1 + len(panels)), cell + 0.5),
                             squeeze=False)
    axes[0, 0].imshow(cam_overlay(image, [[0.0]], max_side=256, alpha=0.0))
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (name, cam) in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(cam_overlay(image, cam, max_side=256))
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
