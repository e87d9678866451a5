"""Models logged before the layout by layer still load: a registry's champion must not break
because cnnflow moved its modules."""

from __future__ import annotations

import json
import sys

import mlflow.pyfunc
import numpy as np
import pytest
import torch

import components.serving as serving_package
from components.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from components.nn.models import create_model
from components.serving import ensemble as ensemble_module
from components.serving.classifier import ImageClassifier
from components.serving.ensemble import EnsembleClassifier, save_members
from components.serving.predict import ModelLoadError, load_model

CLASSES = ["a", "b", "c"]


def _config_and_weights(tmp_path):
    torch.manual_seed(0)
    net, _ = create_model("lenet5", len(CLASSES), weights="none", dropout=0.5, image_size=16)
    config = {"model": "lenet5", "class_names": CLASSES, "image_size": 16,
              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "dropout": 0.5,
              "head_hidden": None}
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    return config, net.state_dict()


def _save_under_old_name(monkeypatch, path, python_model, module: str, artifacts) -> None:
    """Save the model while its class answers to `module` (where 0.1 kept it), as cloudpickle
    then records the class by that name; afterwards the old name is gone again."""
    cls = type(python_model)
    with monkeypatch.context() as m:
        m.setattr(cls, "__module__", module)
        if module == "components.serving":
            m.setattr(serving_package, cls.__name__, cls, raising=False)
        else:
            m.setitem(sys.modules, module, ensemble_module)
        mlflow.pyfunc.save_model(str(path), python_model=python_model, artifacts=artifacts)
    monkeypatch.delattr(serving_package, "ImageClassifier", raising=False)
    monkeypatch.delitem(sys.modules, "components.ensemble", raising=False)


def test_old_layout_classifier_and_ensemble_load_and_predict(tmp_path, monkeypatch):
    config, state = _config_and_weights(tmp_path)
    artifacts = {"config": str(tmp_path / "model_config.json"),
                 "weights": str(tmp_path / "weights.pt")}
    _save_under_old_name(monkeypatch, tmp_path / "single", ImageClassifier(),
                         "components.serving", artifacts)
    members = [ImageClassifier().build(config, state) for _ in range(2)]
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.json").write_text(json.dumps(
        {"vote": "soft", "weights": [0.5, 0.5], "members": save_members(
            members, tmp_path / "ens" / "members")}))
    _save_under_old_name(monkeypatch, tmp_path / "ensemble", EnsembleClassifier(),
                         "components.ensemble",
                         {"ensemble": str(tmp_path / "ens" / "ensemble.json"),
                          "members": str(tmp_path / "ens" / "members")})

    image = np.full((16, 16, 3), 120, dtype=np.uint8)
    expected = ImageClassifier().build(config, state).predict(None, [image])
    for name, kind in (("single", ImageClassifier), ("ensemble", EnsembleClassifier)):
        model = load_model(str(tmp_path / name))
        assert isinstance(model, kind)
        got = model.predict(None, [image])
        assert list(got["label"]) == list(expected["label"])
        assert got["confidence"].iloc[0] == pytest.approx(expected["confidence"].iloc[0],
                                                          rel=1e-5)


def test_a_model_that_cannot_be_unpickled_is_one_line(tmp_path):
    config, _ = _config_and_weights(tmp_path)
    mlflow.pyfunc.save_model(str(tmp_path / "m"), python_model=ImageClassifier(), artifacts={
        "config": str(tmp_path / "model_config.json"), "weights": str(tmp_path / "weights.pt")})
    pickled = next((tmp_path / "m").glob("python_model.pkl"))
    pickled.write_bytes(pickled.read_bytes().replace(b"ImageClassifier", b"ImageClassifiex"))
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_model(str(tmp_path / "m"))
    assert "\n" not in str(info.value)
