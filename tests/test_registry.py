"""Registry versions, the promotion rule (both directions, across digests), rollback, serving."""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from helpers import serve_model
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

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


def test_selection_metric_is_the_validation_counterpart_in_the_same_direction():
    assert registry.selection_metric("test_acc") == "val_acc"
    assert registry.selection_metric("test_loss") == "val_loss"
    assert registry.selection_metric("test_f1_macro") == "val_f1_macro"
    assert registry.selection_metric("latency_ms_p50") == "latency_ms_p50"  # cost: no split
    for metric in registry.VERSION_METRICS:
        chosen = registry.selection_metric(metric)
        assert chosen == metric or chosen in registry.VALIDATION_METRICS, metric
        assert lower_is_better(chosen) == lower_is_better(metric), metric
    assert registry.criteria_line("val_acc", "test_acc") == (
        "candidate chosen by val_acc (validation split); promotion judged on test_acc "
        "(test split)")


def test_validation_chooses_the_challenger_and_test_judges_it(client, trained_pair):
    from components.steps.evaluate import evaluate
    from components.steps.params import EvalParams

    name = "val-chooses"
    versions = {}
    for model, run_id in trained_pair.runs.items():
        out = evaluate(EvalParams(run_id=run_id, registered_model=name, promote=False,
                                  cost=False, num_workers=0), trained_pair.uri,
                       log=lambda s: None)
        versions[model] = out.version.version
    tags = {m: client.get_model_version(name, v).tags for m, v in versions.items()}
    val = {m: float(t["val_acc"]) for m, t in tags.items()}
    test = {m: float(t["test_acc"]) for m, t in tags.items()}
    (a, va), (b, vb) = val.items()
    if (va - vb) * (test[a] - test[b]) >= 0:
        # Two tiny models on colour blobs often tie (or agree) on both splits; the rule under
        # test only shows when validation and test rank them differently, so make them.
        val, test = {a: 0.9, b: 0.6}, {a: 0.5, b: 0.8}
        for m in (a, b):
            client.set_model_version_tag(name, versions[m], "val_acc", repr(val[m]))
            client.set_model_version_tag(name, versions[m], "test_acc", repr(test[m]))
    val_winner = max(val, key=val.get)
    test_winner = max(test, key=test.get)
    assert val_winner != test_winner
    # The test winner is champion; the pipeline's choice must still be the val winner.
    registry.promote(client, name, version=versions[test_winner])
    ranking = registry.choose_challenger(client, name, versions, "test_acc")
    assert ranking.metric == "val_acc" and not ranking.fallback
    assert [label for label, _, _ in ranking.ranked] == [val_winner, test_winner]
    assert client.get_model_version_by_alias(name, "challenger").version == versions[val_winner]
    decision = registry.promote(client, name, metric="test_acc")
    assert decision.version == versions[val_winner] and decision.action == "kept"
    assert (f"test_acc {test[val_winner]:.4f} vs champion v{versions[test_winner]}'s "
            f"{test[test_winner]:.4f}") in decision.reason
    assert champion(client, name) == versions[test_winner]
    # Versions without validation metrics (no val split): test ranks, and says so.
    add_version(client, trained_pair, "no-val", "D", test_acc=0.4)
    add_version(client, trained_pair, "no-val", "D", test_acc=0.7)
    ranking = registry.rank_versions(client, "no-val", {"x": "1", "y": "2"}, "test_acc")
    assert ranking.metric == "test_acc" and "no version has val_acc" in ranking.fallback
    assert [label for label, _, _ in ranking.ranked] == ["y", "x"]


def test_registered_model_description_renders_and_says_how_to_serve(client, trained_pair):
    name = "described"
    add_version(client, trained_pair, name, "D", test_acc=0.5)
    text = client.get_registered_model(name).description
    assert "<" not in text and ">" not in text
    assert f"mlflow models serve -m models:/{name}@champion --env-manager local" in text
    assert f"mlflow.pyfunc.load_model('models:/{name}@champion')" in text
    assert f"experiment {trained_pair.experiment}" in text
    # A model registered by an older cnnflow keeps its '<name>' text until its next version.
    client.update_registered_model(name, description="serve models:/<name>@champion")
    add_version(client, trained_pair, name, "D", test_acc=0.6)
    assert client.get_registered_model(name).description == text



def test_served_champion_answers_http_with_classes_and_probabilities(client, trained_pair,
                                                                     tmp_path):
    add_version(client, trained_pair, "served", "D", test_acc=0.5)
    registry.promote(client, "served")
    with serve_model("models:/served@champion", trained_pair.uri,
                     tmp_path / "serve.log") as url:
        images = sorted((trained_pair.data / "k1").iterdir())[:2] + \
            sorted((trained_pair.data / "k3").iterdir())[:1]
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        response = requests.post(f"{url}/invocations",
                                 json={"dataframe_records": [{"image": e} for e in encoded]},
                                 timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = mlflow.pyfunc.load_model("models:/served@champion").predict(
        pd.DataFrame({"image": [str(p) for p in images]}))
    classes = [f"k{i}" for i in range(6)]
    assert [p["label"] for p in predictions] == list(expected["label"])
    for row, (_, want) in zip(predictions, expected.iterrows(), strict=True):
        assert set(row) == {"label", "confidence", *[f"prob_{c}" for c in classes]}
        assert sum(row[f"prob_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-5)
        for c in classes:
            assert row[f"prob_{c}"] == pytest.approx(want[f"prob_{c}"], abs=1e-6)


def test_promote_unknown_metric_is_one_line_even_when_challenger_is_champion(client,
                                                                             trained_pair):
    name = "metric-typo"
    add_version(client, trained_pair, name, "D", test_acc=0.5)
    assert promote("--registered-model", name).exit_code == 0
    assert champion(client, name) == "1"  # and v1 is still the challenger: the rule reads no
    # metric then, so only an up-front check catches the typo
    result = CliRunner().invoke(cli, ["promote", "--registered-model", name,
                                      "--metric", "tset_acc"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "metric 'tset_acc' is not one evaluate records" in errors[0] and "test_acc" in errors[0]
    assert champion(client, name) == "1"
