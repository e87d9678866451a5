"""The `mlflow.pyfunc` model: raw images in, class names and probabilities out.

It carries its own preprocessing (resize, normalise) so `mlflow models serve` and
`mlflow.pyfunc.load_model(...).predict(...)` need nothing but the logged model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from components.errors import one_line

# Serving runs on the CPU: batch 4 is its fastest (see auto_batch_size).
PREDICT_BATCH = 4


def _rgb(img: Image.Image) -> Image.Image:
    """The training loader's conversion (EXIF orientation applied, transparency on white,
    16-bit scaled), so a served phone photo, RGBA or 16-bit image gives the same pixels the
    model was trained and evaluated on."""
    from components.data.datasets import to_rgb

    img.load()
    return to_rgb(img)


# The one input column of every cnnflow model: base64 image bytes over REST; in-process a
# file path, raw bytes or an HxWx3 array too.
IMAGE_COLUMN = "image"
SERVED_INPUT_ERROR = ("not a base64-encoded image: send the image bytes base64-encoded "
                      "(a served model does not read file paths)")


def serving() -> bool:
    """True inside `mlflow models serve` (and MLflow's log-time check of the input example),
    where a string must never be taken for a path on the server."""
    return bool(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.get())


def to_pil(item: Any) -> Image.Image:
    """Accept a file path, raw bytes, a base64 string (REST) or an HxWx3 uint8 array.

    Served, strings are base64 only and a failure is a 400 (`MlflowException`), so a client
    can neither read the server's files nor probe which exist.
    """
    if serving():
        return _served_pil(item)
    if isinstance(item, Image.Image):
        return _rgb(item)
    if isinstance(item, np.ndarray):
        return _array_pil(item)
    if isinstance(item, bytes | bytearray):
        return _rgb(Image.open(io.BytesIO(item)))
    if isinstance(item, str | Path):
        path = Path(item)
        if len(str(item)) < 4096 and path.exists():
            with Image.open(path) as img:
                return _rgb(img)
        try:
            return _rgb(Image.open(io.BytesIO(base64.b64decode(str(item), validate=True))))
        except (binascii.Error, ValueError, OSError):
            raise ValueError(
                f"not an existing image file or base64 image: {str(item)[:80]}") from None
    raise ValueError(f"unsupported image input of type {type(item).__name__}")


def _array_pil(item: np.ndarray) -> Image.Image:
    if item.ndim == 2:
        return Image.fromarray(item.astype(np.uint8), "L").convert("RGB")
    if item.ndim == 3 and item.shape[-1] in (3, 4):
        return _rgb(Image.fromarray(item.astype(np.uint8)))
    raise ValueError(f"expected an HxWx3 uint8 array, got shape {item.shape}")


def _served_pil(item: Any) -> Image.Image:
    """`to_pil` in the serving process: no path is ever looked at, and every string that is
    not a base64 image gets the same answer, whether or not such a file exists."""
    undecodable = (binascii.Error, ValueError, TypeError, OSError, Image.DecompressionBombError)
    try:
        if isinstance(item, str):
            return _rgb(Image.open(io.BytesIO(base64.b64decode("".join(item.split()),
                                                                validate=True))))
        if isinstance(item, bytes | bytearray):  # e.g. a binary Parquet column
            return _rgb(Image.open(io.BytesIO(item)))
    except undecodable:
        raise MlflowException.invalid_parameter_value(SERVED_INPUT_ERROR) from None
    if isinstance(item, np.ndarray):
        try:
            return _array_pil(item)
        except undecodable as exc:
            raise MlflowException.invalid_parameter_value(one_line(exc)) from None
    if isinstance(item, Image.Image):
        return _rgb(item)
    raise MlflowException.invalid_parameter_value(SERVED_INPUT_ERROR)


def _items(model_input: Any) -> list[Any]:
    """Flatten the shapes pyfunc callers use (DataFrame, list, array batch) into images.

    MLflow turns `{"image": [a, b]}` (a dict of strings) into one row holding the list:
    that row is unpacked again.
    """
    if isinstance(model_input, pd.DataFrame):
        column = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
        values = list(model_input[column])
        if len(values) == 1 and isinstance(values[0], list | tuple):
            return list(values[0])
        return values
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:
            return list(model_input.ravel())
        return [model_input] if model_input.ndim in (2, 3) else list(model_input)
    if isinstance(model_input, dict):
        return _items(model_input.get(IMAGE_COLUMN, next(iter(model_input.values()))))
    if isinstance(model_input, str | bytes | Path | Image.Image):
        return [model_input]
    if isinstance(model_input, Iterable):
        return list(model_input)
    raise ValueError(f"unsupported model input of type {type(model_input).__name__}")


def probability_frame(class_names: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """The output every cnnflow model shares: `label`, `confidence`, one `prob_<class>` each.

    One function for single models and ensembles, so a client (or `mlflow models serve`)
    never needs to know which one it is talking to.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(class_names))
    frame = pd.DataFrame({"label": [class_names[i] for i in probs.argmax(1)],
                          "confidence": probs.max(1) if len(probs) else []})
    for i, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, i]
    return frame


def model_signature(class_names: Sequence[str]) -> ModelSignature:
    """The contract `mlflow models serve` enforces and shows: one required string column
    `image` (base64 image bytes) in, `probability_frame`'s columns out."""
    outputs = [ColSpec("string", "label"), ColSpec("double", "confidence"),
               *(ColSpec("double", f"prob_{name}") for name in class_names)]
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema(outputs))


def input_example(image_path: str | Path) -> pd.DataFrame:
    """One real image as a client sends it (base64 file bytes): MLflow stores it with the
    model (`serving_input_example.json`, what to send) and runs it through the model at log
    time."""
    encoded = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
    return pd.DataFrame({IMAGE_COLUMN: [encoded]})


def config_transform(config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation preprocessing a model config names (resize, normalise): one function, so
    a PyTorch model and its ONNX exports see the same pixels."""
    from components.data.datasets import build_transform

    return build_transform("none", config["image_size"], train=False, mean=config["mean"],
                           std=config["std"])


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Rebuilds the network from the registry and the saved state dict (never a pickle).

    Besides `predict` (raw images in, a DataFrame out) it exposes the tensor-level path that
    evaluation, the ensemble and the inference benchmark share: `input_transforms()` turns a
    PIL image into the tensors the model wants, `score_batch()` turns a batch of them into
    log-probabilities. Evaluation can then decode images in DataLoader workers and still run
    exactly the preprocessing and forward pass that serving runs.
    """

    # Inputs are deliberately untyped (paths, bytes, arrays, base64 strings); the logged
    # signature (`model_signature`) is the served contract.
    _skip_type_hint_validation = True
    # What runs the network: `evaluate` logs it in its cost table (exports: onnx, int8).
    format = "pytorch"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.load(Path(context.artifacts["config"]), Path(context.artifacts["weights"]))

    def load(self, config_path: Path, weights_path: Path) -> ImageClassifier:
        """Build from a `model_config.json` and a state-dict file (a checkpoint works too)."""
        config = json.loads(Path(config_path).read_text())
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        return self.build(config, state.get("model", state))

    def build(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> ImageClassifier:
        """Build from the config dict and a state dict already in memory."""
        from components.nn.models import create_model

        self.config = config
        self.model, _ = create_model(config["model"], len(config["class_names"]),
                                     weights="none", dropout=config["dropout"],
                                     head_hidden=config["head_hidden"],
                                     image_size=config["image_size"])
        self.model.load_state_dict(state)
        self.model.eval()
        self.to("cpu")
        self.transform = config_transform(config)
        # Test-time augmentation (components.serving.tta) the model serves with: `cnnflow
        # evaluate --tta` sets it, and registers a model whose config carries it.
        self.tta = config.get("tta", "none")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def to(self, device: torch.device | str) -> ImageClassifier:
        """Move the network (evaluation measures cost on the run's own device).

        Inference runs channels-last on CPU and CUDA: same outputs (to float rounding),
        measured 1.1-1.5x faster for the torchvision backbones on CPU at batch >= 4.
        """
        self.device = torch.device(device)
        self.channels_last = self.device.type in ("cpu", "cuda")
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def input_transforms(self) -> list[Callable[[Image.Image], torch.Tensor]]:
        """PIL image -> input tensor, one entry per distinct preprocessing (here: one)."""
        return [self.transform]

    def score_batch(self, inputs: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Batched inputs (one tensor per `input_transforms()` entry) -> (log-probabilities on
        the CPU, per-member log-probabilities: none for a single model). With `tta`, the
        probabilities are averaged over its views."""
        from components.serving.tta import averaged_log_proba

        def plain(views: list[torch.Tensor]) -> torch.Tensor:
            return torch.log_softmax(self.logits_batch(views), dim=1)

        return averaged_log_proba(plain, inputs, getattr(self, "tta", "none")), []

    def logits_batch(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw logits for a batch (the `logits` vote of an ensemble averages these)."""
        with torch.inference_mode():
            x = inputs[0].to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu()

    def log_proba(self, images: Sequence[Any]) -> torch.Tensor:
        """Raw images (anything `to_pil` takes) -> N x C log-probabilities, in batches."""
        return log_proba(self, images)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.log_proba(_items(model_input)).exp().numpy()
        return probability_frame(self.class_names, probs)


def log_proba(model: Any, images: Sequence[Any], batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """The shared predict path of every cnnflow model: decode, preprocess, score in batches."""
    transforms = model.input_transforms()
    out = []
    for start in range(0, len(images), batch_size):
        pils = [to_pil(item) for item in images[start:start + batch_size]]
        inputs = [torch.stack([t(img) for img in pils]) for t in transforms]
        out.append(model.score_batch(inputs)[0])
    if not out:
        return torch.zeros((0, len(model.class_names)))
    return torch.cat(out)
