"""`cnnflow train` against a real MLflow server, on tiny real image folders."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BIN, history, runs_of, subprocess_env
from mlflow import MlflowClient

from pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_sec",
                 "train_images_per_sec"]
FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "light"]



def run_cli(*args: str):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def test_two_epoch_run_logs_everything_and_is_reproducible(tracking, image_folder):
    data = image_folder()
    for _ in range(2):
        result = run_cli("--data", str(data), "--experiment", "two-epochs", "--model",
                         "custom_cnn", "--epochs", "2", "--patience", "0", *FAST)
        assert result.exit_code == 0, result.output
    first, second = runs_of(tracking, "two-epochs")
    assert [first.info.run_name, second.info.run_name] == ["custom_cnn-v1", "custom_cnn-v2"]
    # It ends with what to run next, naming this run.
    assert result.output.rstrip().splitlines()[-1].startswith(
        f"next: cnnflow evaluate --run-id {second.info.run_id}")
    assert first.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        assert [s for s, _ in history(tracking, first.info.run_id, name)] == [1, 2], name
    for name in ("best_val_loss", "best_val_acc", "epochs_run", "stopped_early",
                 "skipped_files"):
        assert name in first.data.metrics
    assert first.data.metrics["epochs_run"] == 2
    tags, params = first.data.tags, first.data.params
    assert tags["cnnflow.step"] == "train" and tags["cnnflow.model"] == "custom_cnn"
    assert tags["cnnflow.version"] == "1" and tags["cnnflow.weights_source"] == "random"
    assert tags["cnnflow.dataset"] == data.name and len(tags["cnnflow.dataset_digest"]) == 64
    assert params["lr"] == "0.001" and params["model"] == "custom_cnn"
    assert params["num_classes"] == "3"
    files = {f.path for f in tracking.list_artifacts(first.info.run_id)}
    assert {"checkpoints", "history.json", "figures", "data"} <= files
    assert tags["cnnflow.model_uri"].startswith("models:/")
    ckpts = {f.path for f in tracking.list_artifacts(first.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    # Same seed, same data, CPU: the same numbers.
    assert history(tracking, first.info.run_id, "val_loss") == \
        history(tracking, second.info.run_id, "val_loss")


def test_early_stopping_stops_before_max_epochs(tracking, image_folder):
    result = run_cli("--data", str(image_folder()), "--experiment", "early", "--epochs", "6",
                     "--patience", "1", "--min-delta", "100", *FAST)
    assert result.exit_code == 0, result.output
    assert "stopped early" in result.output
    (run,) = runs_of(tracking, "early")
    assert run.data.metrics["epochs_run"] == 2
    assert run.data.metrics["stopped_early"] == 1
    assert [s for s, _ in history(tracking, run.info.run_id, "val_loss")] == [1, 2]


def test_interrupted_run_resumes_without_duplicate_epochs(tracking, mlflow_server,
                                                          image_folder):
    data = image_folder({"red": 60, "green": 60, "blue": 60})
    args = ["--data", str(data), "--experiment", "resume", "--epochs", "4", "--patience", "0",
            "--seed", "7", *FAST]
    proc = subprocess.Popen([str(BIN / "cnnflow"), "train", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(mlflow_server))
    for line in proc.stderr:
        if "epoch 2/4" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    (run,) = runs_of(tracking, "resume")
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["cnnflow.error"]

    result = run_cli("--resume", run.info.run_id, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    resumed = tracking.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    steps = [s for s, _ in history(tracking, run.info.run_id, "val_loss")]
    assert steps == [1, 2, 3, 4]

    # An uninterrupted run with the same settings gets exactly the same curve.
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    fresh = runs_of(tracking, "resume")[-1]
    assert history(tracking, fresh.info.run_id, "val_loss") == \
        history(tracking, run.info.run_id, "val_loss")


def test_logged_model_predicts_raw_images_in_a_fresh_process(tracking, mlflow_server,
                                                             image_folder):
    data = image_folder()
    result = run_cli("--data", str(data), "--experiment", "pyfunc", "--epochs", "2", *FAST)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "pyfunc")
    model_uri = run.data.tags["cnnflow.model_uri"]
    image = next((data / "red").iterdir())
    script = f"""
import json, mlflow, numpy as np, pandas as pd
from PIL import Image
m = mlflow.pyfunc.load_model({model_uri!r})
path = {str(image)!r}
inputs = [path, open(path, 'rb').read(), np.asarray(Image.open(path).convert('RGB'))]
out = m.predict(pd.DataFrame({{"image": inputs}}))  # the signature's one column
print(json.dumps(out.to_dict(orient='list')))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(mlflow_server), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["label"]) <= {"red", "green", "blue"} and len(out["label"]) == 3
    assert len(set(out["label"])) == 1  # the same image three ways gives one answer
    for i in range(3):
        total = out["prob_red"][i] + out["prob_green"][i] + out["prob_blue"][i]
        assert total == pytest.approx(1.0, abs=1e-4)
        assert out["confidence"][i] == pytest.approx(max(out["prob_red"][i],
                                                         out["prob_green"][i],
                                                         out["prob_blue"][i]))


def test_nan_loss_fails_the_run_with_a_reason(tracking, image_folder):
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder()), "--experiment",
                                      "nan", "--optimizer", "sgd", "--lr", "1e30", "--epochs",
                                      "2", *FAST])
    assert result.exit_code != 0
    assert "loss became" in result.output
    (run,) = runs_of(tracking, "nan")
    assert run.info.status == "FAILED"
    assert "loss became" in run.data.tags["cnnflow.error"]


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--augmentation", "wild"], "wild"),
    (["--resume", "0123456789abcdef"], "does not exist"),
])
def test_bad_input_is_one_line_and_creates_no_run(tracking, image_folder, args, message):
    data = image_folder({"a": 4, "b": 4})
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "bad",
                                      *FAST, *args])
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert runs_of(tracking, "bad") == []


def test_resume_of_a_run_without_parameters_is_one_line(tracking):
    """Killed between creating its run and logging its parameters: nothing to restart from."""
    exp_id = tracking.create_experiment("bare-run")
    run = tracking.create_run(exp_id, tags={"cnnflow.step": "train"})
    result = run_cli("--resume", run.info.run_id)
    assert result.exit_code == 1
    assert "stopped before its parameters were logged" in result.output, result.output
    assert tracking.get_run(run.info.run_id).info.status == "RUNNING"  # left as it was


def test_unreachable_tracking_server_is_a_clear_error(monkeypatch, image_folder):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@127.0.0.1:9")
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder()), *FAST])
    assert result.exit_code == 1
    assert "not reachable" in result.output and "s3cret" not in result.output
    assert time.monotonic() - started < 30


def test_mlflow_run_entry_point(mlflow_server, image_folder):
    data = image_folder({"a": 8, "b": 8})
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "--experiment-name", "mlproject", "-P", f"data={data}", "-P", "model=lenet5",
         "-P", "epochs=1", "-P", "image_size=16", "-P", "num_workers=0", "-P", "weights=none"],
        capture_output=True, text=True, env=subprocess_env(mlflow_server), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = runs_of(client, "mlproject")
    assert run.info.status == "FINISHED" and run.info.run_name == "lenet5-v1"
    assert [s for s, _ in history(client, run.info.run_id, "val_acc")] == [1]


# --------------------------------------------------------------------------- --exclude-file


def test_exclude_file_leaves_listed_images_out_of_train_and_val(tracking, image_folder,
                                                                 tmp_path):
    from components.data.datasets import load_splits

    data = image_folder({"a": 8, "b": 8})
    splits = load_splits(data)
    listed = sorted([splits.relpath(splits.train[0][0]), splits.relpath(splits.val[0][0])])
    exclude = tmp_path / "reviewed.csv"  # the columns label_issues.csv has
    exclude.write_text("path,given_label,suggested_label,quality_score,fold\n"
                       + "".join(f"./{p},a,b,0.1,0\n" for p in listed))
    result = run_cli("--data", str(data), "--experiment", "exclude", "--epochs", "1",
                     "--patience", "0", "--exclude-file", str(exclude), *FAST)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "exclude")
    assert run.data.params["exclude_file"] == str(exclude)
    assert run.data.tags["cnnflow.exclude_file"] == str(exclude.resolve())
    assert run.data.metrics["n_excluded"] == 2
    assert run.data.params["n_train"] == str(len(splits.train) - 1)
    assert run.data.params["n_val"] == str(len(splits.val) - 1)
    manifest = tracking.download_artifacts(run.info.run_id, "data/manifest.csv", str(tmp_path))
    rows = [line.split(",") for line in Path(manifest).read_text().splitlines()[1:]]
    assert len(rows) == 16 - 2 and not {r[0] for r in rows} & set(listed)
    assert sorted(r[0] for r in rows if r[3] == "test") == sorted(
        splits.relpath(p) for p, _ in splits.test)  # the yardstick is untouched
    excluded = tracking.download_artifacts(run.info.run_id, "data/excluded.csv", str(tmp_path))
    assert [line.split(",")[0] for line in Path(excluded).read_text().splitlines()[1:]] == listed
    assert run.data.tags["cnnflow.dataset_digest"] != splits.digest()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{train}\nno/such.png\nno/other.png\n", "2 of the 3 paths"),
    ("{train}\n{test}\n", "in the test split"),
])
def test_bad_exclude_file_is_one_line_and_creates_no_run(tracking, image_folder, tmp_path,
                                                         content, message):
    from components.data.datasets import load_splits

    data = image_folder({"a": 6, "b": 6})
    splits = load_splits(data)
    exclude = tmp_path / "exclude.txt"
    if content is not None:
        exclude.write_text(content.format(train=splits.relpath(splits.train[0][0]),
                                          test=splits.relpath(splits.test[0][0])))
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "bad-ex",
                                      "--exclude-file", str(exclude), *FAST])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "bad-ex") == []


def test_cache_rows_follow_train_and_val_with_images_left_out(image_folder):
    """--exclude-file with --preprocess-run: the tensor cache's rows follow the kept images."""
    import dataclasses

    from components.data.datasets import load_splits
    from components.steps.train import _cache_rows

    cached = load_splits(image_folder({"a": 8, "b": 8}))
    kept = dataclasses.replace(cached, train=cached.train[1:], val=cached.val[:1])
    assert _cache_rows(cached, kept) == {"train": list(range(1, len(cached.train))),
                                         "val": [0]}
    assert _cache_rows(cached, cached) == {}
