"""Registry versions, the promotion rule (both directions, across digests), rollback, serving."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time

import mlflow
import pytest
import requests
from click.testing import CliRunner
from helpers import BIN, subprocess_env
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.services import free_port
from components.tracking import registry
from components.tracking.registry import RegistryError, decide, lower_is_better, register_version
from pipelines.cli import cli


@pytest.fixture
def client(pair_client: MlflowClient) -> MlflowClient:
    return pair_client


def add_version(client: MlflowClient, trained_pair, name: str, digest: str,
                **metrics: float):
    """A new challenger of `name` with the given test metrics (a real logged model)."""
    run = client.get_run(trained_pair.runs["custom_cnn"])
    return register_version(client, run.data.tags["cnnflow.model_uri"], run, name, metrics,
                            digest)


def champion(client: MlflowClient, name: str) -> str:
    return client.get_model_version_by_alias(name, "champion").version


def promote(*args: str):
    return CliRunner().invoke(cli, ["promote", *args], catch_exceptions=False)


def test_promotion_rule_both_directions_across_digests_force_and_rollback(client,
                                                                           trained_pair):
    name = "rule"
    add_version(client, trained_pair, name, "D", test_acc=0.5, test_loss=0.9)
    result = promote("--registered-model", name)
    assert result.exit_code == 0 and "no champion yet" in result.output, result.output
    assert champion(client, name) == "1"

    add_version(client, trained_pair, name, "D", test_acc=0.7, test_loss=0.8)
    result = promote("--registered-model", name, "--min-delta", "0.3")  # 0.2 better: not enough
    assert "champion stays v1" in result.output, result.output
    assert champion(client, name) == "1"
    v2 = client.get_model_version(name, "2")
    assert v2.tags["cnnflow.promotion"] == "kept" and "min_delta 0.3" in \
        v2.tags["cnnflow.promotion_reason"]
    result = promote("--registered-model", name, "--min-delta", "0.1")
    assert "v2 is the new champion" in result.output, result.output
    assert champion(client, name) == "2"

    add_version(client, trained_pair, name, "D", test_acc=0.6)  # worse: champion stays
    assert promote("--registered-model", name).exit_code == 0
    assert champion(client, name) == "2"
    assert client.get_model_version(name, "3").tags["cnnflow.promotion"] == "kept"

    add_version(client, trained_pair, name, "E", test_acc=0.99)  # better, other split
    result = promote("--registered-model", name)
    assert "different dataset split" in result.output, result.output
    assert champion(client, name) == "2"
    result = promote("--registered-model", name, "--force")
    assert champion(client, name) == "4" and "forced" in \
        client.get_model_version(name, "4").tags["cnnflow.promotion"]

    result = promote("--registered-model", name, "--version", "1")
    assert "rolled back to v1" in result.output, result.output
    assert champion(client, name) == "1"
    assert client.get_model_version(name, "1").tags["cnnflow.promotion"] == "rollback"

    add_version(client, trained_pair, name, "D", test_acc=0.1, test_loss=0.2)
    result = promote("--registered-model", name, "--metric", "test_loss")  # lower is better
    assert "v5 is the new champion" in result.output, result.output
    assert champion(client, name) == "5"


def test_decide_is_a_pure_rule():
    class V:
        def __init__(self, version, digest="D"):
            self.version, self.tags = version, {"cnnflow.dataset_digest": digest}

    assert decide(V("2"), None, "test_acc", 0.1, None, 0.0, False)[0] == "promoted"
    assert decide(V("2"), V("1"), "test_acc", 0.8, 0.8, 0.0, False)[0] == "kept"  # a tie
    assert decide(V("2"), V("1"), "test_acc", 0.81, 0.8, 0.0, False)[0] == "promoted"
    assert decide(V("2"), V("1"), "test_loss", 0.81, 0.8, 0.0, False)[0] == "kept"
    assert decide(V("2", "E"), V("1"), "test_acc", 0.9, 0.8, 0.0, False)[0] == "kept"
    assert decide(V("2", "E"), V("1"), "test_acc", 0.1, 0.8, 0.0, True)[0] == "forced"
    with pytest.raises(RegistryError, match="has no test_acc"):
        decide(V("2"), V("1"), "test_acc", None, 0.8, 0.0, False)
    assert lower_is_better("test_loss") and lower_is_better("latency_ms_p95")
    assert not lower_is_better("test_acc") and not lower_is_better("test_acc_loss_class")


def test_promote_bad_input_is_one_line_and_changes_nothing(client, trained_pair):
    for args, message in [
        (["--registered-model", "nothing-here"], "has no alias 'challenger'"),
        ([], "pass --registered-model NAME or --experiment NAME"),
        (["--experiment", "nowhere"], "'nowhere-classifier' has no alias 'challenger'"),
        (["--registered-model", "a/b"], "invalid registered model name"),
    ]:
        result = CliRunner().invoke(cli, ["promote", *args])
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    add_version(client, trained_pair, "bad-promote", "D", test_acc=0.5)
    result = CliRunner().invoke(cli, ["promote", "--registered-model", "bad-promote",
                                      "--version", "9"])
    assert result.exit_code == 1 and "has no version 9" in result.output
    assert registry.get_alias(client, "bad-promote", "champion") is None


def test_registering_is_all_or_nothing(client, trained_pair, monkeypatch):
    def broken(*args, **kwargs):
        raise MlflowException("alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException, match="alias service down"):
        add_version(client, trained_pair, "half-done", "D", test_acc=0.5)
    with pytest.raises(MlflowException):
        client.get_registered_model("half-done")  # created and removed again
    monkeypatch.undo()
    add_version(client, trained_pair, "half-done", "D", test_acc=0.5)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException):
        add_version(client, trained_pair, "half-done", "D", test_acc=0.6)
    assert [v.version for v in client.search_model_versions("name = 'half-done'")] == ["1"]



def test_served_champion_answers_http_with_classes_and_probabilities(client, trained_pair):
    add_version(client, trained_pair, "served", "D", test_acc=0.5)
    registry.promote(client, "served")
    port = free_port()
    env = subprocess_env(trained_pair.uri)
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/served@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        images = sorted((trained_pair.data / "k1").iterdir())[:2] + \
            sorted((trained_pair.data / "k3").iterdir())[:1]
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        response = requests.post(f"http://127.0.0.1:{port}/invocations",
                                 json={"dataframe_records": [{"image": e} for e in encoded]},
                                 timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        expected = mlflow.pyfunc.load_model("models:/served@champion").predict(
            [str(p) for p in images])
        classes = [f"k{i}" for i in range(6)]
        assert [p["label"] for p in predictions] == list(expected["label"])
        for row, (_, want) in zip(predictions, expected.iterrows(), strict=True):
            assert set(row) == {"label", "confidence", *[f"prob_{c}" for c in classes]}
            assert sum(row[f"prob_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-5)
            for c in classes:
                assert row[f"prob_{c}"] == pytest.approx(want[f"prob_{c}"], abs=1e-6)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
