"""Alerts (`cnnflow notify`, components/notify.py) through apprise to a real local JSON webhook.

The webhook is an HTTP server on 127.0.0.1 that records every POSTed JSON body (apprise's
`json://` service); its URL path carries a made-up token that must never be printed. Training,
promotion and sync run for real against the session's MLflow and Mongo-wire servers.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner
from helpers import BIN, runs_of, subprocess_env
from mlflow import MlflowClient
from pymongo import MongoClient

from components import humanize, notify, tracking
from components.names import BEST_PARAM_TAG_PREFIX
from components.tracking import registry
from pipelines.cli import cli

TOKEN = "tok3n-s3cret-4242"  # the webhook's secret path: never in any output
FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--model", "lenet5", "--epochs", "1", "--patience", "0"]


class Webhook:
    """A JSON webhook on a free loopback port: `messages` holds every POSTed body; with
    `hang=True` it takes each request and never answers (`connections` holds their times)."""

    def __init__(self, hang: bool = False) -> None:
        self.messages: list[dict] = []
        self.connections: list[float] = []
        self.stop = threading.Event()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hook.connections.append(time.monotonic())
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hang:
                    hook.stop.wait(120)
                    return
                hook.messages.append({**json.loads(body), "path": self.path})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"json://127.0.0.1:{self.port}/hooks/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self, event: str) -> list[dict]:
        """Messages whose title ends with the event (`finished`, `failed`, `died`, ...)."""
        return [m for m in self.messages if m["title"].endswith(f" {event}")]


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def fields(message: dict) -> dict[str, str]:
    """The `key: value` lines of an alert's body."""
    return dict(line.split(": ", 1) for line in message["message"].splitlines())


def run_train(uri: str, hook_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cnnflow"), "train", *args], capture_output=True,
                          text=True, timeout=600,
                          env=subprocess_env(uri, CNNFLOW_NOTIFY=hook_url, **env))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Training finished / failed
# --------------------------------------------------------------------------------------------


def test_a_finished_and_a_failed_training_each_send_one_alert(mlflow_server, webhook,
                                                              image_folder):
    client = MlflowClient(mlflow_server)
    data = image_folder({"a": 8, "b": 8})
    done = run_train(mlflow_server, webhook.url, "--data", str(data), "--experiment",
                     "notify-ok", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(client, "notify-ok")
    (message,) = webhook.messages
    assert message["type"] == "success" and message["path"] == f"/hooks/{TOKEN}"
    assert message["title"] == f"cnnflow: {run.info.run_name} finished"
    got = fields(message)
    assert got["run"] == run.info.run_name and got["status"] == "FINISHED"
    assert got["step"] == "train"
    best = run.data.metrics["best_val_acc"]
    assert got[humanize.label("best_val_acc")] == humanize.number(best, "best_val_acc")
    assert got["MLflow"] == tracking.run_url(mlflow_server, run.info.experiment_id,
                                             run.info.run_id)
    assert "error" not in got

    # A real failure after the run exists: the loss diverges in the first epoch.
    failed = run_train(mlflow_server, webhook.url, "--data", str(data), "--experiment",
                       "notify-nan", *FAST, "--optimizer", "sgd", "--lr", "1e30")
    assert failed.returncode == 1
    (bad,) = runs_of(client, "notify-nan")
    assert bad.info.status == "FAILED"
    assert len(webhook.messages) == 2
    (alert,) = webhook.events("failed")
    assert alert["type"] == "failure" and bad.info.run_name in alert["title"]
    got = fields(alert)
    assert got["status"] == "FAILED" and got["run"] == bad.info.run_name
    assert got["error"].startswith("NonFiniteLossError: ") and "loss became nan" in got["error"]
    assert got["error"] in bad.data.tags["cnnflow.error"]
    assert got["MLflow"].endswith(f"/runs/{bad.info.run_id}?workflowType=machine_learning")
    for out in (done, failed):
        assert TOKEN not in out.stdout + out.stderr


def test_a_webhook_that_never_answers_delays_the_run_less_than_the_timeout(
        mlflow_server, image_folder, tmp_path):
    """The alert waits at most CNNFLOW_NOTIFY_TIMEOUT: retries fit inside it, the run is
    FINISHED, and one masked line says the alert did not go out."""
    hook = Webhook(hang=True)
    timeout = 4.0
    try:
        with (tmp_path / "stderr.txt").open("w+") as errors:
            proc = subprocess.Popen(
                [str(BIN / "cnnflow"), "train", "--data", str(image_folder({"a": 8, "b": 8})),
                 "--experiment", "notify-hang", *FAST], stdout=subprocess.PIPE, stderr=errors,
                text=True, env=subprocess_env(mlflow_server, CNNFLOW_NOTIFY=hook.url,
                                              CNNFLOW_NOTIFY_TIMEOUT=str(timeout)))
            printed: list[tuple[float, str]] = []
            reader = threading.Thread(target=lambda: printed.extend(
                (time.monotonic(), line) for line in proc.stdout), daemon=True)
            reader.start()
            proc.wait(timeout=600)
            reader.join(10)
            errors.seek(0)
            err = errors.read()
    finally:
        hook.close()
    assert proc.returncode == 0, err[-3000:]
    (run,) = runs_of(MlflowClient(mlflow_server), "notify-hang")
    assert run.info.status == "FINISHED"
    # The result line comes right after the alert gave up: less than `timeout` after the
    # first attempt reached the webhook, with at least one retry in between.
    result_at = next(t for t, line in printed if f"run {run.info.run_id}" in line)
    assert hook.connections, "the alert never reached the webhook"
    waited = result_at - hook.connections[0]
    assert 0 < waited < timeout, waited
    assert 2 <= len(hook.connections) <= 1 + notify.DEFAULT_RETRIES
    (warning,) = [line for line in err.splitlines() if "alert not sent" in line]
    assert f"json://127.0.0.1:{hook.port}/..." in warning
    assert TOKEN not in err and TOKEN not in "".join(line for _, line in printed)


# --------------------------------------------------------------------------------------------
# New champion
# --------------------------------------------------------------------------------------------


def test_each_new_champion_sends_one_alert_with_old_and_new_metric(pair_client, trained_pair,
                                                                   webhook, monkeypatch):
    monkeypatch.setenv("CNNFLOW_NOTIFY", webhook.url)
    name = f"notify-{uuid4().hex[:6]}"
    run = pair_client.get_run(trained_pair.runs["custom_cnn"])

    def add_version(test_acc: float) -> None:
        registry.register_version(pair_client, run.data.tags["cnnflow.model_uri"], run, name,
                                  {"test_acc": test_acc}, "D")

    def promote() -> str:
        result = CliRunner().invoke(cli, ["promote", "--registered-model", name])
        assert result.exit_code == 0, result.output
        return result.output

    add_version(0.5)
    assert "no champion yet" in promote()
    (first,) = webhook.events("champion")
    assert first["title"] == f"cnnflow: {name} v1 is the new champion"
    assert fields(first)["version"] == "v1"
    assert fields(first)["test accuracy"] == "50.0 % (v1, first champion)"

    add_version(0.7)
    assert "is the new champion" in promote()
    add_version(0.6)  # not better: the champion stays, nothing is sent
    assert "champion stays" in promote()
    assert len(webhook.messages) == 2
    second = webhook.messages[1]
    got = fields(second)
    assert got["model"] == f"{name}@champion" and got["version"] == "v1 -> v2"
    assert got["test accuracy"] == "50.0 % (v1) -> 70.0 % (v2)"
    assert got["reason"].startswith("test_acc 0.7000 vs champion v1's 0.5000")
    assert got["MLflow"] == tracking.version_url(trained_pair.uri, name, "2")


# --------------------------------------------------------------------------------------------
# The pipeline: one alert for the whole job (plus the new champion), none for its steps
# --------------------------------------------------------------------------------------------


def test_a_pipeline_sends_one_finished_alert_and_its_champion(mlflow_server, webhook,
                                                              image_folder, tmp_path):
    experiment = f"notify-pipe-{uuid4().hex[:6]}"
    result = CliRunner(env={"MLFLOW_TRACKING_URI": mlflow_server,
                            "CNNFLOW_NOTIFY": webhook.url}).invoke(cli, [
        "run", "--data", str(image_folder({"a": 8, "b": 8})), "--experiment", experiment,
        "--models", "lenet5", "--weights", "none", "--image-size", "16", "--epochs", "1",
        "--batch-size", "8", "--num-workers", "0", "--augmentation", "none",
        "--sync", "false", "--report", "false", "--reports-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_server)
    (parent,) = [r for r in runs_of(client, experiment)
                 if r.data.tags.get("cnnflow.step") == "pipeline"]
    assert sorted(m["title"].rsplit(" ", 1)[1] for m in webhook.messages) == [
        "champion", "finished"]  # eda, preprocess, train, evaluate, promote: nothing
    (done,) = webhook.events("finished")
    got = fields(done)
    assert got["run"] == parent.info.run_name and got["step"] == "pipeline"
    assert got["champion"] == parent.data.tags["cnnflow.champion_uri"]
    test_acc = parent.data.metrics["summary.champion.test_acc"]
    assert got["test accuracy"] == humanize.number(test_acc, "test_acc")
    assert got["MLflow"] == tracking.run_url(mlflow_server, parent.info.experiment_id,
                                             parent.info.run_id)


# --------------------------------------------------------------------------------------------
# Tune finished: one alert for the study, none for its trials or the retrained best
# --------------------------------------------------------------------------------------------


def test_a_study_sends_one_alert_and_its_trials_none(mlflow_server, webhook, image_folder,
                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CNNFLOW_NOTIFY", webhook.url)
    result = CliRunner().invoke(cli, [
        "tune", "--data", str(image_folder({"a": 8, "b": 8})), "--experiment", "notify-tune",
        "--n-trials", "2", "--space", "lr: [0.01, 0.001]", "--sampler", "grid",
        "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--retrain-best", "true",
        *FAST])
    assert result.exit_code == 0, result.output
    runs = runs_of(MlflowClient(mlflow_server), "notify-tune")
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.step") == "tune"]
    assert len(runs) == 4  # the study, two trials and the retrained best: one alert
    (alert,) = webhook.messages
    assert alert["title"] == f"cnnflow: {parent.info.run_name} finished"
    got = fields(alert)
    assert got["step"] == "tune" and got["run"] == parent.info.run_name
    best = parent.data.metrics["best_value"]
    assert got["best val_loss"] == humanize.number(best, "val_loss")
    assert got["best params"] == f"lr={parent.data.tags[BEST_PARAM_TAG_PREFIX + 'lr']}"
    assert got["trials"] == "2 complete, 0 pruned, 0 failed"
    test_acc = parent.data.metrics["retrained_test_acc"]
    assert got["retrained test accuracy"] == humanize.number(test_acc, "test_acc")
    assert got["MLflow"] == tracking.run_url(mlflow_server, parent.info.experiment_id,
                                             parent.info.run_id)


# --------------------------------------------------------------------------------------------
# Run died (the mirror)
# --------------------------------------------------------------------------------------------


def test_a_died_run_is_announced_once_across_sync_passes(mlflow_server, mongo_server, webhook):
    client = MlflowClient(mlflow_server)
    exp = f"notify-died-{uuid4().hex[:6]}"
    exp_id = client.create_experiment(exp)
    old = int(time.time() * 1000) - 3_600_000  # started an hour ago, silent since
    run = client.create_run(exp_id, start_time=old, run_name="custom_cnn-v1",
                            tags={"cnnflow.step": "train", "cnnflow.model": "custom_cnn"})
    run_id = run.info.run_id
    mongo = f"{mongo_server}/notify_{uuid4().hex[:8]}"
    env = subprocess_env(mlflow_server, MONGO_URI=mongo, CNNFLOW_NOTIFY=webhook.url)

    def sync() -> str:
        done = subprocess.run([str(BIN / "cnnflow"), "sync", "--experiments", exp,
                               "--dead-after", "5"], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert TOKEN not in done.stdout + done.stderr
        return done.stdout

    sync()
    (alert,) = webhook.events("died")
    assert alert["type"] == "failure" and alert["title"] == "cnnflow: custom_cnn-v1 died"
    got = fields(alert)
    assert got["run"] == "custom_cnn-v1" and got["resume"] == f"cnnflow train --resume {run_id}"
    assert got["MLflow"] == tracking.run_url(mlflow_server, exp_id, run_id)
    # The run changes (still silent): the next pass rewrites it, and sends nothing again.
    client.set_tag(run_id, "note", "still nobody home")
    assert "1 written" in sync()
    assert len(webhook.messages) == 1
    status = MongoClient(mongo, serverSelectionTimeoutMS=5000)[mongo.rsplit("/", 1)[1]]
    doc = status["status"].find_one({"_id": run_id})
    assert doc["status"] == "died" and doc[notify.DIED_FLAG] is True


# --------------------------------------------------------------------------------------------
# cnnflow notify
# --------------------------------------------------------------------------------------------


def notify_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cnnflow"), "notify", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_notify_test_reaches_the_webhook_and_a_closed_port_is_one_masked_line(webhook):
    done = notify_cli("--test", CNNFLOW_NOTIFY=webhook.url, CNNFLOW_NOTIFY_TIMEOUT="5")
    assert done.returncode == 0, done.stderr
    (message,) = webhook.messages
    assert message["title"] == "cnnflow: test alert"
    assert f"json://127.0.0.1:{webhook.port}/...: sent in" in done.stdout

    port = closed_port()
    failed = notify_cli("--test", CNNFLOW_NOTIFY=f"json://user:pa55word@127.0.0.1:{port}/"
                        f"hooks/{TOKEN}", CNNFLOW_NOTIFY_TIMEOUT="5")
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"Error: json://user:****@127.0.0.1:{port}/... did not take the "
                           "test message")
    for secret in (TOKEN, "pa55word"):
        assert secret not in failed.stdout + failed.stderr
    assert len(webhook.messages) == 1


def test_notify_shows_masked_targets_and_add_writes_a_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("CNNFLOW_NOTIFY", raising=False)
    off = CliRunner().invoke(cli, ["notify"])
    assert off.exit_code == 0 and off.output.startswith("alerts are off")
    assert CliRunner().invoke(cli, ["notify", "--test"]).exit_code == 1  # nothing to test

    slack = "slack://T1234ABCD/B5678EFGH/abcdefghijklmnop"
    added = CliRunner().invoke(cli, ["notify", "--add", slack])
    assert added.exit_code == 0, added.output
    path = tmp_path / notify.CONFIG_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    CliRunner().invoke(cli, ["notify", "--add", f"json://127.0.0.1:9/hooks/{TOKEN}"])
    shown = CliRunner().invoke(cli, ["notify"])
    assert shown.exit_code == 0
    assert shown.output.splitlines()[1:] == ["  slack://T...D/...", "  json://127.0.0.1:9/..."]
    assert f"from {path}" in shown.output
    for secret in ("T1234ABCD", "B5678EFGH", "abcdefghijklmnop", TOKEN):
        assert secret not in added.output + shown.output
    assert notify.load_config().urls == (slack, f"json://127.0.0.1:9/hooks/{TOKEN}")

    # The environment replaces the file; a URL apprise cannot use is one line, masked.
    monkeypatch.setenv("CNNFLOW_NOTIFY", f"nosuchservice://{TOKEN}@host")
    bad = CliRunner().invoke(cli, ["notify"])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "nosuchservice://***" in bad.output and TOKEN not in bad.output
    path.write_text("urls: [json://127.0.0.1:9/x]\nwebhook: 1\n")
    monkeypatch.delenv("CNNFLOW_NOTIFY")
    bad = CliRunner().invoke(cli, ["notify"])
    assert bad.exit_code == 1 and "unknown key 'webhook'" in bad.output


def test_alert_hooks_never_raise_and_do_nothing_when_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("CNNFLOW_NOTIFY", raising=False)
    assert not notify.enabled()
    assert notify.send(notify.probe_message()) == []
    monkeypatch.setenv("CNNFLOW_NOTIFY", "nosuchservice://x")  # bad config: warned, not raised
    assert notify.run_ended("train", "m-v1", "FINISHED", {}, "http://x") is None
    assert notify.run_ended_message("train", "m-v1", "KILLED", {}, "http://x") is None
    message = notify.tune_message("tune-v3", "val_acc", 0.875, {"lr": 0.01, "model": "lenet5"},
                                  {"complete": 3, "pruned": 1, "failed": 0}, "http://x/r")
    got = fields({"message": message.body})
    assert got["best val_acc"] == "87.5 %" and got["best params"] == "lr=0.01, model=lenet5"
    assert got["trials"] == "3 complete, 1 pruned, 0 failed"


@pytest.mark.parametrize(("url", "shown", "secrets"), [
    ("json://127.0.0.1:8080/hooks/abc123", "json://127.0.0.1:8080/...", ["abc123"]),
    ("json://me:pw0rd@example.org/x?token=zzz", "json://me:****@example.org/...",
     ["pw0rd", "zzz"]),
    ("slack://T1234ABCD/B5678EFGH/abcdefghijklmnop", "slack://T...D/...",
     ["T1234ABCD", "B5678EFGH", "abcdefghijklmnop"]),
    ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/12345", "tgram://1...w/...",
     ["123456789", "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"]),
    ("discord://1234567890/abcdefghijklmnop", "discord://1...0/...",
     ["1234567890", "abcdefghijklmnop"]),
    ("nosuchservice://secret", "nosuchservice://***", ["secret"]),
])
def test_mask_and_scrub_hide_tokens_passwords_and_webhook_paths(url, shown, secrets):
    assert notify.mask(url) == shown
    text = notify.scrub(f"error at {url}; parts: {' / '.join(secrets)}; occurred", [url])
    assert text.startswith("error at ***; parts: ") and text.endswith("; occurred")
    for secret in secrets:
        assert secret not in text


def test_every_attempt_and_wait_fits_in_the_timeout():
    """Connect + read timeout of each attempt, and the waits between, add up to at most the
    timeout, so no request is open when the caller stops waiting."""
    for timeout in (4.0, 20.0, 600.0):
        for retries in range(0, 11):
            config = notify.Config(("json://x",), "test", timeout, retries)
            total = (retries + 1) * 2 * config.attempt_seconds() + retries * config.wait()
            assert 0 < total <= timeout + 1e-9, (timeout, retries)


def test_config_file_documented_keys_match():
    """docs/alerts.md names every notify.yaml key."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "alerts.md").read_text()
    for key in notify.CONFIG_KEYS:
        assert f"{key}:" in text, key
