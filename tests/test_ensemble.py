"""`cnnflow ensemble`: votes, member checks, the logged model, bagging - real server, real runs."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, runs_of, subprocess_env
from mlflow import MlflowClient

from components.serving.ensemble import get_vote
from components.steps.ensemble import (
    EnsembleError,
    bootstrap_train,
    resolve_weights,
    select_members,
)
from pipelines.cli import cli

CLASSES = [f"k{i}" for i in range(6)]


@pytest.fixture
def client(pair_client: MlflowClient) -> MlflowClient:
    return pair_client


def test_votes_average_what_they_say():
    z1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z2 = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    w = torch.tensor([0.25, 0.75])
    p1, p2 = torch.softmax(z1, 1), torch.softmax(z2, 1)
    soft = get_vote("soft")([z1, z2], w).exp()
    assert torch.allclose(soft, (0.25 * p1 + 0.75 * p2).double(), atol=1e-9)
    logits = get_vote("logits")([z1, z2], w).exp()
    assert torch.allclose(logits, torch.softmax(0.25 * z1 + 0.75 * z2, 1).double(), atol=1e-9)
    hard = get_vote("hard")([z1, z2], w).exp()
    assert hard.argmax(1).tolist() == [1, 2]  # the heavier member wins both
    assert hard[0, 1] == pytest.approx(0.75, abs=1e-5)
    tie = get_vote("hard")([z1, z2], torch.tensor([0.5, 0.5])).exp()
    assert tie.argmax(1).tolist() == [1, 2]  # ties go to the higher mean probability
    with pytest.raises(EnsembleError, match="unknown vote 'median'"):
        get_vote("median")


def test_ensemble_is_the_average_of_member_probabilities(client, trained_pair, tmp_path):
    a, b = trained_pair.runs["custom_cnn"], trained_pair.runs["lenet5"]
    result = CliRunner().invoke(cli, ["ensemble", "--run-ids", f"{a},{b}", "--vote", "soft"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = runs_of(client, trained_pair.experiment, "ensemble")[-1]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("ensemble-v")
    assert run.data.tags["cnnflow.members"] == f"{a},{b}"
    assert run.data.params["vote"] == "soft" and run.data.params["n_members"] == "2"
    member = client.get_run(a)
    assert run.data.tags["cnnflow.dataset_digest"] == member.data.tags["cnnflow.dataset_digest"]

    # Manual soft vote: the mean of the members' own predicted probabilities.
    local = client.download_artifacts(run.info.run_id, "data/manifest.csv", str(tmp_path))
    with open(local) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    paths = [str(trained_pair.data / r["path"]) for r in rows]
    labels = np.array([int(r["class_index"]) for r in rows])
    cols = [f"prob_{c}" for c in CLASSES]
    member_probs = [mlflow.pyfunc.load_model(client.get_run(r).data.tags["cnnflow.model_uri"])
                    .predict({"image": paths})[cols].to_numpy() for r in (a, b)]
    mean = (member_probs[0] + member_probs[1]) / 2
    m = run.data.metrics
    assert m["test_acc"] == pytest.approx((mean.argmax(1) == labels).mean())
    assert m["test_loss"] == pytest.approx(-np.log(mean[np.arange(len(labels)), labels]).mean(),
                                           rel=1e-4)
    assert {"val_acc", "val_loss", "test_f1_macro", "test_top5_acc"} <= set(m)

    # The logged pyfunc model answers like a single model, with the averaged probabilities.
    served = mlflow.pyfunc.load_model(run.data.tags["cnnflow.model_uri"]).predict(
        {"image": paths})
    assert list(served.columns) == ["label", "confidence", *cols]
    assert np.allclose(served[cols].to_numpy(), mean, atol=1e-5)

    files = {f.path for f in client.list_artifacts(run.info.run_id, "members")}
    assert files == {"members/comparison.csv", "members/comparison.md"}
    table = Path(client.download_artifacts(run.info.run_id, "members/comparison.csv",
                                           str(tmp_path))).read_text()
    assert "custom_cnn-v1" in table and "lenet5-v1" in table and "soft vote" in table
    assert {"evaluation/test"} <= {f.path for f in client.list_artifacts(run.info.run_id,
                                                                          "evaluation")}

    # Evaluated, registered and promoted like any model.
    result = CliRunner().invoke(cli, ["evaluate", "--run-id", run.info.run_id,
                                      "--registered-model", "ens-reg", "--latency-runs", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    version = client.get_model_version_by_alias("ens-reg", "champion")
    assert version.run_id == run.info.run_id and version.tags["cnnflow.step"] == "ensemble"
    assert client.get_run(run.info.run_id).data.metrics["params_count"] > 0


def test_top_k_picks_the_best_runs_of_one_split(client, trained_pair):
    runs = select_members(client, [], 2, trained_pair.experiment)
    accs = [r.data.metrics["best_val_acc"] for r in runs]
    assert {r.info.run_id for r in runs} == set(trained_pair.runs.values())
    assert accs == sorted(accs, reverse=True)
    assert resolve_weights("val_acc", runs) == pytest.approx([x / sum(accs) for x in accs])
    assert resolve_weights("1,3", runs) == pytest.approx([0.25, 0.75])


def fake_member(client: MlflowClient, source_run: str, **overrides: str) -> str:
    src = client.get_run(source_run)
    exp = client.get_experiment_by_name("fake-members")
    exp_id = exp.experiment_id if exp else client.create_experiment("fake-members")
    tags = {k: v for k, v in src.data.tags.items() if k.startswith("cnnflow.")}
    tags.update(overrides)
    run = client.create_run(exp_id, tags={k: v for k, v in tags.items() if v is not None})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_bad_members_are_refused_in_one_line_and_log_nothing(client, trained_pair):
    a, b = trained_pair.runs["custom_cnn"], trained_pair.runs["lenet5"]
    other_split = fake_member(client, b, **{"cnnflow.dataset_digest": "0" * 64})
    other_classes = fake_member(client, b, **{"cnnflow.class_names": "x,y"})
    no_model = fake_member(client, b, **{"cnnflow.model_uri": ""})
    before = len(runs_of(client, trained_pair.experiment, "ensemble"))
    cases = [
        ([a, other_split], [], "different dataset splits"),
        ([a, other_classes], [], "different class lists"),
        ([a, no_model], [], "has no logged model"),
        ([a, "0123456789abcdef0123456789abcdef"], [], "does not exist"),
        ([a], [], "at least 2 members"),
        ([a, a], [], "listed twice"),
        ([a, b], ["--weights", "1,2,3"], "3 weights for 2 members"),
        ([a, b], ["--weights", "heavy"], "are not numbers"),
        ([a, b], ["--vote", "median"], "unknown vote 'median'"),
        ([a, b], ["--bagging", "1"], "bagging must be 0"),
    ]
    for ids, extra, message in cases:
        result = CliRunner().invoke(cli, ["ensemble", "--run-ids", ",".join(ids), *extra])
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], \
            (ids, extra, result.output)
    result = CliRunner().invoke(cli, ["ensemble", "--experiment", "no-such-experiment"])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert len(runs_of(client, trained_pair.experiment, "ensemble")) == before


def test_bootstrap_keeps_every_class_and_the_split(trained_pair):
    from components.data.datasets import load_splits

    splits = load_splits(str(trained_pair.data))
    sample = bootstrap_train(7)(splits)
    assert len(sample.train) == len(splits.train)
    assert sorted({label for _, label in sample.train}) == list(range(6))
    assert len(set(sample.train)) < len(sample.train)  # drawn with replacement
    assert sample.val == splits.val and sample.test == splits.test
    assert bootstrap_train(7)(splits).train == sample.train  # seeded


def test_bagging_trains_nested_members_on_bootstrap_samples(client, image_folder):
    data = image_folder({"a": 8, "b": 8, "c": 8})
    result = CliRunner().invoke(cli, [
        "ensemble", "--bagging", "2", "--model", "custom_cnn", "--data", str(data),
        "--experiment", "bagging", "--epochs", "1", "--image-size", "16", "--batch-size", "8",
        "--init-weights", "none", "--patience", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (parent,) = runs_of(client, "bagging", "ensemble")
    members = runs_of(client, "bagging", "train")
    assert parent.info.status == "FINISHED" and len(members) == 2
    assert parent.data.params["bagging"] == "2" and parent.data.params["model"] == "custom_cnn"
    assert parent.data.tags["cnnflow.members"] == ",".join(m.info.run_id for m in members)
    for member in members:
        assert member.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert member.data.tags["cnnflow.dataset_digest"] == \
            parent.data.tags["cnnflow.dataset_digest"]
    assert {m.data.tags["cnnflow.bootstrap_seed"] for m in members} == {"43", "44"}
    assert "test_acc" in parent.data.metrics and parent.data.tags["cnnflow.model_uri"]


def test_mlflow_run_entry_points_ensemble_then_evaluate(client, trained_pair):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = subprocess_env(trained_pair.uri)
    ids = ",".join(trained_pair.runs.values())

    def mlflow_run(*args: str) -> None:
        proc = subprocess.run([str(BIN / "mlflow"), "run", str(root), "--env-manager",
                               "local", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    mlflow_run("-e", "ensemble", "--experiment-name", trained_pair.experiment,
               "-P", f"run_ids={ids}", "-P", "vote=logits")
    run = runs_of(client, trained_pair.experiment, "ensemble")[-1]
    assert run.info.status == "FINISHED" and run.data.params["vote"] == "logits"
    assert run.data.params["data"] == "digits"  # the entry point's default, logged by MLflow
    assert run.data.tags["cnnflow.data"] == str(trained_pair.data)  # what evaluate reads
    mlflow_run("-e", "evaluate", "--experiment-name", "jobs", "-P", f"run_id={run.info.run_id}",
               "-P", "cost=false", "-P", "registered_model=via-mlproject")
    assert "test_f1_macro" in client.get_run(run.info.run_id).data.metrics
    assert client.get_model_version_by_alias("via-mlproject", "champion").run_id == \
        run.info.run_id
    (job,) = runs_of(client, "jobs", "evaluate")
    assert job.data.tags["cnnflow.evaluated_run_id"] == run.info.run_id


def test_look_alike_folders_are_different_datasets_for_ensemble_and_promotion(client, tmp_path):
    """Same relative file names, other pixels: the digest tells them apart (issue 14, point 1)."""
    from helpers import write_image

    folders = [tmp_path / side / "shapes" for side in ("a", "b")]
    for f, folder in enumerate(folders):
        for ci, (cls, rgb) in enumerate((("red", (220, 30, 30)), ("blue", (30, 60, 220)))):
            for i in range(5):
                write_image(folder / cls / f"{i}.png", rgb, seed=1000 * f + 10 * ci + i)
    for folder in folders:
        result = CliRunner().invoke(cli, [
            "train", "--data", str(folder), "--experiment", "look-alike", "--model", "lenet5",
            "--epochs", "1", "--image-size", "16", "--batch-size", "8", "--num-workers", "0",
            "--weights", "none", "--patience", "0", "--augmentation", "none"],
            catch_exceptions=False)
        assert result.exit_code == 0, result.output
    runs = runs_of(client, "look-alike", "train")
    a, b = (r.info.run_id for r in runs)
    digests = [r.data.tags["cnnflow.dataset_digest"] for r in runs]
    assert digests[0] != digests[1]

    result = CliRunner().invoke(cli, ["ensemble", "--run-ids", f"{a},{b}"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "different dataset splits" in errors[0]
    assert runs_of(client, "look-alike", "ensemble") == []

    for run_id in (a, b):
        result = CliRunner().invoke(cli, ["evaluate", "--run-id", run_id, "--cost", "false",
                                          "--registered-model", "look-alike"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
    v1, v2 = (client.get_model_version("look-alike", v) for v in ("1", "2"))
    assert [v1.tags["cnnflow.dataset_digest"], v2.tags["cnnflow.dataset_digest"]] == digests
    assert client.get_model_version_by_alias("look-alike", "champion").version == "1"
    assert v2.tags["cnnflow.promotion"] == "kept"
    assert "not comparable" in v2.tags["cnnflow.promotion_reason"]
