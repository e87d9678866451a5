"""Served models with a contract: the signature and input example every cnnflow model
carries, and a real `mlflow models serve` answering REST clients (base64 only, 400s that
say what to send) - real server, real runs."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from helpers import serve_model
from mlflow.models import Model
from PIL import Image

from components.serving.classifier import SERVED_INPUT_ERROR

CLASSES = [f"k{i}" for i in range(6)]
OUTPUTS = ["label", "confidence", *(f"prob_{c}" for c in CLASSES)]


@pytest.fixture(scope="module")
def lenet(trained_pair) -> tuple[str, Path]:
    """(model URI, an image of its dataset) of the pair's lenet5 run."""
    run = mlflow.MlflowClient(trained_pair.uri).get_run(trained_pair.runs["lenet5"])
    return run.data.tags["cnnflow.model_uri"], next((trained_pair.data / "k0").glob("*.png"))


@pytest.fixture(scope="module")
def served(trained_pair, lenet, tmp_path_factory: pytest.TempPathFactory):
    """URL of one real `mlflow models serve` of the lenet5 model, for every REST check."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_model(lenet[0], trained_pair.uri, log) as url:
        yield url


def _assert_own_folder(uri: str, info: mlflow.models.model.ModelInfo) -> None:
    """A logged model's name is also a folder of its run (`runs:/<id>/<name>` lists both):
    it must not merge with the run's own artifacts."""
    client = mlflow.MlflowClient(uri)
    assert info.name not in {f.path for f in client.list_artifacts(info.run_id)}
    model_files = {f"{info.name}/{f.path}"
                   for f in client.list_logged_model_artifacts(info.model_id)}
    assert f"{info.name}/MLmodel" in model_files
    assert {f.path for f in client.list_artifacts(info.run_id, info.name)} == model_files


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _invoke(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def _error(response: requests.Response) -> str:
    """The part of a 400 that is the model's own answer (MLflow first echoes the input)."""
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body, body
    return body["message"].split("Error: ", 1)[-1]


def test_logged_model_carries_its_signature_and_a_real_input_example(trained_pair, lenet):
    uri, _ = lenet
    info = mlflow.models.get_model_info(uri)
    assert info.name == "lenet5"  # named after its architecture, not "model"
    _assert_own_folder(trained_pair.uri, info)
    inputs = info.signature.inputs.to_dict()
    assert inputs == [{"type": "string", "name": "image", "required": True}]
    outputs = info.signature.outputs.to_dict()
    assert [c["name"] for c in outputs] == OUTPUTS
    assert [c["type"] for c in outputs] == ["string"] + ["double"] * (len(OUTPUTS) - 1)

    local = mlflow.artifacts.download_artifacts(uri)
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"] and len(example) == 1  # one image: cheap to log
    sent = base64.b64decode(example["image"][0], validate=True)
    assert sent in {p.read_bytes() for p in trained_pair.data.rglob("*.png")}
    assert (Path(local) / "serving_input_example.json").is_file()


def test_served_model_answers_base64_images(served, lenet):
    image = lenet[1]
    pixels = np.asarray(Image.open(image).convert("RGB"))
    for payload in ({"inputs": {"image": [_b64(image), _b64(image)]}},
                    {"dataframe_split": {"columns": ["image"], "data": [[_b64(image)]]}}):
        response = _invoke(served, payload)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert rows and all(list(row) == OUTPUTS for row in rows)
        for row in rows:
            probs = [row[f"prob_{c}"] for c in CLASSES]
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)
            assert row["confidence"] == pytest.approx(max(probs))
            assert row["label"] == CLASSES[int(np.argmax(probs))]
    # The same answer in-process, where the column may hold a path or an HxWx3 array.
    model = mlflow.pyfunc.load_model(lenet[0])
    local = model.predict(pd.DataFrame({"image": [str(image), pixels]}))
    assert list(local.columns) == OUTPUTS and list(local["label"]) == [rows[0]["label"]] * 2
    assert local["confidence"].iloc[0] == pytest.approx(rows[0]["confidence"], abs=1e-5)


def test_served_model_never_reads_a_server_path(served, lenet):
    image = lenet[1]
    existing = _invoke(served, {"inputs": {"image": [str(image)]}})
    missing = _invoke(served, {"inputs": {"image": [str(image.with_name("absent.png"))]}})
    assert existing.status_code == missing.status_code == 400, (existing.text, missing.text)
    assert _error(existing) == _error(missing) == SERVED_INPUT_ERROR
    assert "Traceback" not in existing.text + missing.text
    undecodable = _invoke(served, {"inputs": {"image": [_b64(image)[:40]]}})
    assert undecodable.status_code == 400 and _error(undecodable) == SERVED_INPUT_ERROR


def test_served_model_names_its_input_column(served, lenet):
    response = _invoke(served, {"inputs": {"img": [_b64(lenet[1])]}})
    assert response.status_code == 400, response.text
    assert "missing inputs ['image']" in response.json()["message"], response.text


def test_ensemble_is_logged_as_ensemble_with_the_same_contract(pair_client, trained_pair,
                                                               lenet):
    from components.steps.ensemble import run_ensemble
    from components.steps.params import EnsembleParams

    runs = ",".join(trained_pair.runs[m] for m in ("custom_cnn", "lenet5"))
    outcome = run_ensemble(EnsembleParams(run_ids=runs, vote="soft", num_workers=0),
                           trained_pair.uri, log=lambda s: None)
    info = mlflow.models.get_model_info(outcome.model_uri)
    assert info.name == "ensemble"
    _assert_own_folder(trained_pair.uri, info)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == OUTPUTS
    assert info.saved_input_example_info["type"] == "dataframe"
    out = mlflow.pyfunc.load_model(outcome.model_uri).predict({"image": [str(lenet[1])] * 2})
    assert list(out.columns) == OUTPUTS and len(out) == 2
