"""Test-time augmentation: the view registry, and `cnnflow evaluate --tta` against a real
MLflow server (recorded on the run and the registered version, which serves the same
probabilities evaluate measured)."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import make_image_folder

from components.serving.tta import VIEW_SETS, TtaError, averaged_log_proba, check_tta, views
from pipelines.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", sorted(VIEW_SETS))
def test_every_view_keeps_the_batch_shape(name):
    x = torch.randn(3, 3, 16, 16)
    out = [view(x) for view in views(name)]
    assert out and all(v.shape == x.shape for v in out)
    assert torch.equal(out[0], x)  # the plain image is always one of the views


def test_averaged_log_proba_is_the_mean_of_the_views_probabilities():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(5, 3, 8, 8)

    def score(inputs):
        return torch.log_softmax(net(inputs[0]), dim=1)

    got = averaged_log_proba(score, [x], "hflip").exp()
    want = (torch.softmax(net(x), 1) + torch.softmax(net(torch.flip(x, dims=[3])), 1)) / 2
    assert torch.allclose(got.float(), want, atol=1e-6)
    assert not torch.allclose(got.float(), torch.softmax(net(x), 1), atol=1e-4)
    with pytest.raises(TtaError, match="unknown tta 'rot90': use one of none | hflip"):
        check_tta("rot90")


@pytest.fixture(scope="module")
def tta_run(mlflow_server, tmp_path_factory):
    """One tiny model of its own (the session's trained_pair stays unevaluated by --tta)."""
    from components.steps.params import TrainParams
    from components.steps.train import train

    data = make_image_folder(tmp_path_factory.mktemp("tta") / "tta3",
                             {"a": 10, "b": 10, "c": 10})
    params = TrainParams(data=str(data), experiment="tta", epochs=1, image_size=16,
                         batch_size=8, num_workers=0, weights="none", patience=0,
                         augmentation="none")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        return train(params, mlflow_server, progress=False, log=lambda s: None).run_id, data


def _test_split(client, run_id, data, tmp_path):
    with open(client.download_artifacts(run_id, "data/manifest.csv", str(tmp_path))) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    return [str(data / r["path"]) for r in rows], np.array([int(r["class_index"]) for r in rows])


def test_evaluate_tta_hflip_records_it_and_serves_the_averaged_probabilities(
        tracking, tta_run, tmp_path):
    from components.data.datasets import load_rgb
    from components.serving.predict import load_model

    run_id, data = tta_run
    result = invoke("evaluate", "--run-id", run_id, "--tta", "hflip", "--registered-model",
                    "tta-model", "--latency-runs", "3", "--explain-images", "0",
                    "--promote", "false", "--device", "cpu")
    assert result.exit_code == 0, result.output
    run = tracking.get_run(run_id)
    assert run.data.tags["cnnflow.evaluated_test_tta"] == "hflip"
    (found,) = tracking.search_model_versions("name = 'tta-model'")
    version = tracking.get_model_version("tta-model", found.version)
    assert version.tags["cnnflow.tta"] == "hflip"
    assert version.source != run.data.tags["cnnflow.model_uri"]  # a model that serves TTA
    logged = tracking.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.tags["cnnflow.tta"] == "hflip" and logged.source_run_id == run_id

    # The reference, computed here with the plain network of the run's own model.
    plain = load_model(run.data.tags["cnnflow.model_uri"])
    assert plain.tta == "none"
    paths, labels = _test_split(tracking, run_id, data, tmp_path)
    x = torch.stack([plain.transform(load_rgb(p)) for p in paths])
    with torch.inference_mode():
        net = plain.model.eval()
        p_plain = torch.softmax(net(x), 1).double().numpy()
        p_flip = torch.softmax(net(torch.flip(x, dims=[3])), 1).double().numpy()
    reference = (p_plain + p_flip) / 2
    assert np.abs(reference - p_plain).max() > 1e-6  # the mirror changes something

    served = load_model(f"models:/tta-model/{version.version}")
    assert served.tta == "hflip" and served.config["tta"] == "hflip"
    frame = served.predict(None, pd.DataFrame({"image": paths}))
    probs = frame[[f"prob_{c}" for c in ("a", "b", "c")]].to_numpy()
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    m = run.data.metrics
    assert m["test_loss"] == pytest.approx(
        -np.log(reference[np.arange(len(labels)), labels]).mean(), rel=1e-4)
    assert m["test_acc"] == pytest.approx((reference.argmax(1) == labels).mean())


def test_evaluate_unknown_tta_is_one_line_before_anything_is_written(tracking, tta_run):
    run_id, _ = tta_run
    before = tracking.get_run(run_id).data
    result = invoke("evaluate", "--run-id", run_id, "--tta", "mirror", "--registered-model",
                    "tta-bad")
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "unknown tta 'mirror': use one of none | hflip | hflip+crops" in lines[0]
    after = tracking.get_run(run_id).data
    assert after.tags == before.tags and after.metrics == before.metrics
    assert tracking.search_registered_models("name = 'tta-bad'") == []
