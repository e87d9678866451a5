"""Logging cnnflow's pyfunc models (a classifier, an ensemble) into a run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature


def log_pyfunc_model(run_id: str, weights_path: Path, model_config: dict[str, Any],
                     example_image: str | Path | None, name: str = "") -> str:
    """Log the best weights as a pyfunc model that does its own preprocessing; returns its URI.

    Named after its architecture (`resnet18`, ...) unless `name` says otherwise.
    """
    from components.serving.classifier import ImageClassifier

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "model_config.json"
        config_path.write_text(json.dumps(model_config, indent=2))
        return log_python_model(run_id, ImageClassifier(),
                                {"weights": str(weights_path), "config": str(config_path)},
                                model_config["class_names"], example_image,
                                name=name or model_config["model"])


def log_python_model(run_id: str, python_model: mlflow.pyfunc.PythonModel,
                     artifacts: dict[str, str], class_names: Sequence[str],
                     example_image: str | Path | None, *, name: str,
                     extra_requirements: Sequence[str] = (),
                     signature: ModelSignature | None = None) -> str:
    """Log any cnnflow pyfunc model (a classifier, an ensemble, a cascade) into a run; returns
    its URI.

    Every model carries the served contract (`model_signature`: base64 `image` in, label,
    confidence and prob_<class> out; a cascade passes its own `signature`, boxes out) and one
    real image as its input example,
    which MLflow runs through the model at log time. The `components` package travels with
    the model (code_paths), so it loads in a fresh environment that has only torch,
    torchvision, pillow and pandas (plus `extra_requirements`: onnxruntime for an export).
    """
    import numpy
    import pandas
    import PIL
    import torch
    import torchvision

    from components.serving.classifier import input_example, model_signature

    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={_public(torch.__version__)}",
                    f"torchvision=={_public(torchvision.__version__)}",
                    f"pillow=={PIL.__version__}", f"pandas=={pandas.__version__}",
                    f"numpy=={numpy.__version__}", *extra_requirements]
    # No example (the signature still holds) when the split's files are not on this machine.
    example = (input_example(example_image)
               if example_image and Path(example_image).is_file() else None)
    with _quiet_model_logging(), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=python_model, artifacts=artifacts,
            signature=signature or model_signature(class_names), input_example=example,
            code_paths=[str(Path(__file__).resolve().parents[1])], pip_requirements=requirements)
    return info.model_uri


def _public(version: str) -> str:
    """`2.14.1+cu130` -> `2.14.1`: a local build tag would make the pin uninstallable elsewhere."""
    return version.split("+")[0]


@contextlib.contextmanager
def _quiet_model_logging():
    """Keep stdout for cnnflow's own summary: MLflow's cloudpickle advice does not apply (the
    wrapper holds no state) and it prints the run URL, which cnnflow prints itself."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


