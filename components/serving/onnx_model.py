"""The ONNX Runtime pyfunc model: the PyTorch model's contract, a faster engine underneath.

`OnnxClassifier` keeps `ImageClassifier`'s preprocessing (`config_transform`), predict path
(`log_proba` + `probability_frame`) and tensor-level interface (`input_transforms`,
`score_batch`, `logits_batch`, `class_names`, `to`, `device`), so `load_model`,
`predict_samples`, evaluate, the ensemble, pseudo-label and `mlflow models serve` take an
exported model unchanged. Only the forward pass differs: an ONNX graph (fp32, or int8 QDQ)
run by ONNX Runtime's CPU provider with as many threads as torch uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.serving.classifier import _items, config_transform, log_proba, probability_frame

# The graph's input and output names (both exporters are told to use them).
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_FILE = "model.onnx"


def inference_session(path: str | Path) -> Any:
    """An ONNX Runtime session on the CPU with torch's thread count, so a comparison with the
    PyTorch model runs on the same cores (ONNX Runtime's default would take every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    # No busy-waiting between runs: on a few cores the spinning threads starve the
    # preprocessing (torch) that feeds the next batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


class OnnxClassifier(mlflow.pyfunc.PythonModel):
    """An exported cnnflow model: `model_config.json` (the PyTorch model's, plus `format`,
    `opset`, `exporter`) and `model.onnx`; raw images in, label / confidence / prob_<class>
    out, exactly as `ImageClassifier`."""

    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.load(Path(context.artifacts["config"]), Path(context.artifacts["onnx"]))

    def load(self, config_path: Path, onnx_path: Path) -> OnnxClassifier:
        """Build from a `model_config.json` and an ONNX file."""
        return self.build(json.loads(Path(config_path).read_text()), onnx_path)

    def build(self, config: dict[str, Any], onnx_path: str | Path) -> OnnxClassifier:
        self.config = config
        self.onnx_path = Path(onnx_path)
        self.session = inference_session(self.onnx_path)
        self.size_bytes = self.onnx_path.stat().st_size
        self.params_count = _initializer_count(self.onnx_path)
        self.transform = config_transform(config)
        self.device = torch.device("cpu")
        return self

    @property
    def format(self) -> str:
        return str(self.config.get("format", "onnx"))

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def to(self, device: torch.device | str) -> OnnxClassifier:
        """ONNX Runtime runs here on its CPU provider whatever the device asked: the model
        stays on the CPU (and says so through `device`)."""
        self.device = torch.device("cpu")
        return self

    def footprint(self) -> tuple[int, int]:
        """(parameters, bytes on disk) for `measure_cost`: the graph's initialisers and file."""
        return self.params_count, self.size_bytes

    def input_transforms(self) -> list[Callable[[Image.Image], torch.Tensor]]:
        return [self.transform]

    def score_batch(self, inputs: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.log_softmax(self.logits_batch(inputs), dim=1), []

    def logits_batch(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = np.ascontiguousarray(inputs[0].detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]).float()

    def log_proba(self, images: Sequence[Any]) -> torch.Tensor:
        return log_proba(self, images)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.log_proba(_items(model_input)).exp().numpy()
        return probability_frame(self.class_names, probs)


def _initializer_count(path: Path) -> int:
    """Number of stored values (weights, biases; int8 scales and zero points too)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) if t.dims else 1 for t in graph.initializer))
