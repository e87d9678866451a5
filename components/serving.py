"""The `mlflow.pyfunc` model: raw images in, class names and probabilities out.

It carries its own preprocessing (resize, normalise) so `mlflow models serve` and
`mlflow.pyfunc.load_model(...).predict(...)` need nothing but the logged model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

PREDICT_BATCH = 64


def to_pil(item: Any) -> Image.Image:
    """Accept a file path, raw bytes, a base64 string (REST) or an HxWx3 uint8 array."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            return Image.fromarray(item.astype(np.uint8), "L").convert("RGB")
        if item.ndim == 3 and item.shape[-1] in (3, 4):
            return Image.fromarray(item.astype(np.uint8)).convert("RGB")
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {item.shape}")
    if isinstance(item, bytes | bytearray):
        return Image.open(io.BytesIO(item)).convert("RGB")
    if isinstance(item, str | Path):
        path = Path(item)
        if len(str(item)) < 4096 and path.exists():
            return Image.open(path).convert("RGB")
        try:
            return Image.open(io.BytesIO(base64.b64decode(str(item), validate=True))).convert("RGB")
        except (binascii.Error, ValueError, OSError):
            raise ValueError(
                f"not an existing image file or base64 image: {str(item)[:80]}") from None
    raise ValueError(f"unsupported image input of type {type(item).__name__}")


def _items(model_input: Any) -> list[Any]:
    """Flatten the shapes pyfunc callers use (DataFrame, list, array batch) into images."""
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:
            return list(model_input.ravel())
        return [model_input] if model_input.ndim in (2, 3) else list(model_input)
    if isinstance(model_input, dict):
        return _items(model_input.get("image", next(iter(model_input.values()))))
    if isinstance(model_input, str | bytes | Path | Image.Image):
        return [model_input]
    if isinstance(model_input, Iterable):
        return list(model_input)
    raise ValueError(f"unsupported model input of type {type(model_input).__name__}")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from the registry and the saved state dict (never a pickle)."""

    # Inputs are deliberately untyped (paths, bytes, arrays, base64 strings).
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from components.datasets import build_transform
        from components.models import create_model

        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        cfg = self.config
        self.model, _ = create_model(cfg["model"], len(cfg["class_names"]), weights="none",
                                     dropout=cfg["dropout"], head_hidden=cfg["head_hidden"],
                                     image_size=cfg["image_size"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("model", state))
        self.model.eval()
        self.transform = build_transform("none", cfg["image_size"], train=False,
                                         mean=cfg["mean"], std=cfg["std"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = [self.transform(to_pil(item)) for item in _items(model_input)]
        classes = self.config["class_names"]
        probs = []
        with torch.inference_mode():
            for start in range(0, len(images), PREDICT_BATCH):
                batch = torch.stack(images[start:start + PREDICT_BATCH])
                probs.append(torch.softmax(self.model(batch).float(), dim=1))
        p = torch.cat(probs).numpy() if probs else np.zeros((0, len(classes)))
        frame = pd.DataFrame({"label": [classes[i] for i in p.argmax(1)],
                              "confidence": p.max(1) if len(p) else []})
        for i, name in enumerate(classes):
            frame[f"prob_{name}"] = p[:, i]
        return frame
