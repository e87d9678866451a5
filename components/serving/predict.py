"""Predicting with a logged model: load it, decode a list of images, score in batches."""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from components.data.datasets import load_rgb
from components.errors import CnnflowError, one_line
from components.files import remove_stale_temp, temp_prefix
from components.progress import track


class ModelLoadError(CnnflowError, RuntimeError):
    """A model that cannot be loaded or used; one line saying what to do."""


def load_model(model_uri: str) -> Any:
    """The cnnflow model behind a URI (ImageClassifier or EnsembleClassifier), on the CPU.

    The download goes to a temp folder removed once the model is in memory (its load_context
    reads config and weights eagerly), so loads never pile model copies up in the temp dir.
    """
    import mlflow.pyfunc

    _accept_old_layout()
    remove_stale_temp()  # what killed runs left behind
    saved_path = list(sys.path)
    try:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("model")) as tmp:
            pyfunc = mlflow.pyfunc.load_model(model_uri, dst_path=tmp)
    except (MlflowException, OSError, ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load model {model_uri}: "
                             f"{one_line(f'{type(exc).__name__}: {exc}')}") from None
    finally:
        sys.path[:] = saved_path  # MLflow put the copy's code/ folder first; it is gone now
    model = pyfunc.unwrap_python_model()
    if not hasattr(model, "score_batch"):
        raise ModelLoadError(f"{model_uri} is not a cnnflow image model (no score_batch)")
    return model


def _accept_old_layout() -> None:
    """Models logged before the layout by layer pickled their class by its old name,
    `components.serving.ImageClassifier` or `components.ensemble.EnsembleClassifier`: point
    those names at the classes' homes now, so the champion of an existing registry loads."""
    import components.serving as package
    from components.serving import classifier, ensemble

    package.ImageClassifier = classifier.ImageClassifier  # type: ignore[attr-defined]
    sys.modules.setdefault("components.ensemble", ensemble)


class TransformedImages(Dataset):
    """Decode each image once and apply every preprocessing the model needs."""

    def __init__(self, samples: Sequence[tuple[str, int]],
                 transforms: Sequence[Callable[[Image.Image], torch.Tensor]]) -> None:
        self.samples = list(samples)
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        path, label = self.samples[index]
        img = load_rgb(path)
        return [t(img) for t in self.transforms], label


@dataclass
class Predictions:
    """Log-probabilities for a list of samples (and, for an ensemble, per member)."""

    log_proba: torch.Tensor
    labels: np.ndarray
    paths: list[str]
    members: list[torch.Tensor] = field(default_factory=list)

    @property
    def probs(self) -> np.ndarray:
        return self.log_proba.exp().double().numpy()


def auto_batch_size(device: torch.device) -> int:
    """64 on CUDA; 4 elsewhere. On 2 CPU cores at 224 px, batch 4 is 1.1-1.3x the per-image
    loop and batch 16 no better than it (benchmarks/inference.py): activations outgrow the
    caches, and blocks over 32 MB go back to the OS after every forward."""
    return 64 if device.type == "cuda" else 4


def predict_samples(model: Any, samples: Sequence[tuple[str, int]], batch_size: int = 4,
                    num_workers: int = 0, progress: str = "") -> Predictions:
    """Batched prediction: DataLoader decoding (optionally in workers), one forward per batch.

    `progress`: a label (`evaluate custom_cnn-v3`) shows the images scored, as a bar on a
    terminal or a line every few seconds (components.progress); empty shows nothing.
    `benchmarks/inference.py` measures this against a per-image loop.
    """
    dataset = TransformedImages(samples, model.input_transforms())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=min(num_workers, math.ceil(len(samples) / batch_size)),
                        pin_memory=getattr(model, "device", torch.device("cpu")).type == "cuda")
    outs: list[torch.Tensor] = []
    members: list[list[torch.Tensor]] = []
    batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]] = loader
    if progress:
        batches = track(loader, len(samples), progress, "image", weight=lambda b: len(b[1]))
    for inputs, _ in batches:
        combined, per_member = model.score_batch(inputs)
        outs.append(combined)
        members.append(per_member)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    n_members = len(members[0]) if members else 0
    return Predictions(log_proba=torch.cat(outs).double(), labels=labels,
                       paths=[p for p, _ in samples],
                       members=[torch.cat([m[i] for m in members]).double()
                                for i in range(n_members)])
