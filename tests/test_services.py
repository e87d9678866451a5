"""`cnnflow up | down | status` with real server processes (no mocks)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BIN, free_port
from mlflow import MlflowClient
from pymongo import MongoClient

from components import services
from components.services import ServiceError
from pipelines.cli import cli

SECRET = "s3cr3t-pw"
NO_MLFLOW = "no MLflow server: run `cnnflow up` or set MLFLOW_TRACKING_URI"
NO_MONGO = "no MongoDB server: run `cnnflow up` or set MONGO_URI"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private CNNFLOW_HOME, so these tests never touch the session's servers."""
    path = tmp_path / "home"
    monkeypatch.setenv("CNNFLOW_HOME", str(path))
    return path


def cnnflow(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def lines_of(output: str) -> dict[str, str]:
    """Service name -> its status line."""
    return {ln.split()[0]: ln for ln in output.splitlines() if ln.split()[:1] in (["mlflow"],
                                                                                   ["mongo"])}


def gone(pid: int, wait: float = 5.0) -> bool:
    """The process has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not services._alive(pid):
            return True
        time.sleep(0.1)
    return False


def dead_pid() -> int:
    """The pid of a process that has already exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_up_status_down_round_trip(home: Path):
    mlflow_port, mongo_port = free_port(), free_port()
    ports = ["--mlflow-port", str(mlflow_port), "--mongo-port", str(mongo_port)]
    result = cnnflow("up", *ports)
    try:
        assert result.exit_code == 0, result.output
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        mongo_url = f"mongodb://127.0.0.1:{mongo_port}"
        assert f"MLflow UI: {mlflow_url}" in result.output
        # `mlflow run` reads only the environment: `up` says what to export, `env` prints it.
        printed = result.output.splitlines()
        exports = [f"export MLFLOW_TRACKING_URI={mlflow_url}", f"export MONGO_URI={mongo_url}"]
        assert [ln for ln in printed if ln.startswith("export ")] == exports
        assert printed.index(exports[0]) > max(printed.index(ln) for ln in lines_of(
            result.output).values())  # after the status lines
        assert 'eval "$(cnnflow env)"' in result.output
        assert cnnflow("env").output.splitlines() == exports

        shown = lines_of(cnnflow("status").output)
        assert shown["mlflow"].split()[1:3] == ["running", mlflow_url]
        assert shown["mongo"].split()[1:3] == ["running", mongo_url]
        assert "mlflow.log" in shown["mlflow"] and "mongo.log" in shown["mongo"]
        pids = {name: int((home / f"{name}.pid").read_text()) for name in ("mlflow", "mongo")}
        assert f"pid {pids['mlflow']}" in shown["mlflow"]

        # Clients find the servers `up` recorded, and both really answer.
        assert services.tracking_uri() == mlflow_url
        assert services.mongo_uri() == mongo_url
        client = MlflowClient(tracking_uri=mlflow_url)
        exp_id = client.create_experiment("round-trip")
        assert client.get_experiment(exp_id).name == "round-trip"
        with MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as mongo:
            mongo.cnnflow_test.things.insert_one({"_id": 1, "x": "y"})
            assert mongo.cnnflow_test.things.find_one({"_id": 1})["x"] == "y"

        # A second `up` leaves the running servers alone, whatever ports it is given.
        started = time.monotonic()
        again = cnnflow("up", "--mlflow-port", str(free_port()))
        assert again.exit_code == 0, again.output
        assert time.monotonic() - started < 20  # no restart: the pids below are unchanged
        assert {n: int((home / f"{n}.pid").read_text()) for n in pids} == pids
        assert lines_of(again.output)["mlflow"].split()[1:3] == ["running", mlflow_url]
    finally:
        stopped = cnnflow("down")
    assert stopped.exit_code == 0, stopped.output
    assert all(gone(pid) for pid in pids.values())
    assert not list(home.glob("*.pid")) and not list(home.glob("*.json"))
    shown = lines_of(cnnflow("status").output)
    assert shown["mlflow"].split()[1] == "stopped" and shown["mongo"].split()[1] == "stopped"
    with pytest.raises(ServiceError, match="not reachable"):
        services.check_tracking_server(mlflow_url, timeout=1)
    with pytest.raises(ServiceError, match="not reachable"):
        services.check_mongo(mongo_url, timeout=0.5)
    # Gone means gone: no client falls back to the stopped servers' (or any other) address.
    with pytest.raises(ServiceError, match="no MLflow server"):
        services.tracking_uri()
    with pytest.raises(ServiceError, match="no MongoDB server"):
        services.mongo_uri()
    # The data outlives the servers: it sits in the state folder.
    assert (home / "mlflow.db").is_file() and (home / "mongo").is_dir()


def test_external_services_are_used_not_started(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-mlflow.invalid:5000")
    monkeypatch.setenv("MONGO_URI", f"mongodb://alice:{SECRET}@db.invalid:27017/cnnflow")
    for command in ("up", "status", "down"):
        result = cnnflow(command)
        assert result.exit_code == 0, result.output
        shown = lines_of(result.output)
        assert shown["mlflow"].split()[1:3] == ["external", "http://team-mlflow.invalid:5000"]
        assert shown["mongo"].split()[1:3] == ["external",
                                               "mongodb://alice:***@db.invalid:27017/cnnflow"]
        assert SECRET not in result.output
        assert "export " not in result.output  # external servers are exported already
    assert not list(home.glob("*.pid")) and not (home / "logs").exists()
    assert services.mongo_uri() == f"mongodb://alice:{SECRET}@db.invalid:27017/cnnflow"


def test_busy_port_is_one_line_error_naming_the_log(home: Path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = cnnflow("up", "--mlflow-port", str(port), "--mongo-port", str(free_port()))
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert f"port {port} on 127.0.0.1 is already in use" in message
    assert f"--mlflow-port {port + 1}" in message
    assert str(home / "logs" / "mlflow.log") in message
    assert not list(home.glob("*.pid"))  # checked before anything was started


def test_stale_pid_file_is_cleaned_up(home: Path):
    home.mkdir(parents=True)
    stale = dead_pid()
    (home / "mongo.pid").write_text(f"{stale}\n")
    assert lines_of(cnnflow("status", "mongo").output)["mongo"].split()[1] == "stopped"
    result = cnnflow("up", "mongo", "--mongo-port", str(free_port()))
    try:
        assert result.exit_code == 0, result.output
        pid = int((home / "mongo.pid").read_text())
        assert pid != stale
        assert lines_of(result.output)["mongo"].split()[1] == "running"
        services.check_mongo(services.mongo_uri(), timeout=5)
    finally:
        assert cnnflow("down", "mongo").exit_code == 0
    assert gone(pid)


def test_server_that_dies_at_start_is_reported_with_its_log(home: Path):
    home.mkdir(parents=True)
    (home / "mongo").write_text("a file where the storage folder should be")
    result = cnnflow("up", "mongo", "--mongo-port", str(free_port()))
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert "mongo: the MongoDB-wire server (secantusd-py) exited during start-up" in message
    assert "File exists" in message and str(home / "logs" / "mongo.log") in message
    assert not (home / "mongo.pid").exists()


def test_server_too_slow_is_stopped(home: Path):
    result = cnnflow("up", "mlflow", "--mlflow-port", str(free_port()), "--timeout", "0.3")
    assert result.exit_code != 0
    assert "did not answer" in result.output and "mlflow.log" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (home / "mlflow.pid").exists()
    log = (home / "logs" / "mlflow.log").read_text()
    pid_line = next(ln for ln in log.splitlines() if ln.startswith("--- cnnflow up"))
    assert "mlflow server" in pid_line


def test_uris_follow_env_else_up_else_one_line_error(home: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    # Nothing set, nothing started: one line, never a guessed http://127.0.0.1:5000.
    for uri, message in ((services.tracking_uri, NO_MLFLOW), (services.mongo_uri, NO_MONGO)):
        with pytest.raises(ServiceError) as err:
            uri()
        assert str(err.value) == message
    # A record whose process is gone (a crash, `kill -9`) is no server either.
    write_stale_record(home, "mlflow", "http://127.0.0.1:5999")
    with pytest.raises(ServiceError, match="no MLflow server"):
        services.tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert services.tracking_uri() == "sqlite:///elsewhere.db"


def write_stale_record(home: Path, name: str, url: str) -> None:
    """What a crashed `cnnflow up` leaves: pid file and record of a process that is gone."""
    home.mkdir(parents=True, exist_ok=True)
    pid = dead_pid()
    (home / f"{name}.pid").write_text(f"{pid}\n")
    (home / f"{name}.json").write_text(json.dumps({"name": name, "pid": pid, "url": url}))


class _Decoy(http.server.BaseHTTPRequestHandler):
    """Answers like a healthy MLflow server (/health: 200 OK) and logs every request."""

    def do_GET(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def decoys(home: Path, monkeypatch: pytest.MonkeyPatch):
    """Someone else's servers, exactly where a guess would look: an MLflow-like HTTP server and
    a bare TCP listener (for Mongo) on the default ports (patched to theirs) and in stale
    records of a crashed `up`. Yields the list of what reached them."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MONGO_URI", raising=False)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Decoy)
    web.seen = []
    wire = socket.create_server(("127.0.0.1", 0))
    wire.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = wire.accept()
            except TimeoutError:
                continue
            web.seen.append("mongo connect")
            conn.close()

    threads = [threading.Thread(target=web.serve_forever, daemon=True),
               threading.Thread(target=accept, daemon=True)]
    for thread in threads:
        thread.start()
    ports = {"mlflow": web.server_address[1], "mongo": wire.getsockname()[1]}
    for name, port in ports.items():
        spec = services.SERVICES[name]
        monkeypatch.setitem(services.SERVICES, name, dataclasses.replace(spec, default_port=port))
        write_stale_record(home, name, spec.url("127.0.0.1", port))
    try:
        yield web.seen
    finally:
        stop.set()
        web.shutdown()
        web.server_close()
        for thread in threads:
            thread.join(timeout=5)
        wire.close()


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "1", "--weights", "none"], NO_MLFLOW),
    (["sync"], NO_MLFLOW),
    (["sync", "--follow", "true"], NO_MLFLOW),
    (["report"], NO_MLFLOW),
    (["compare"], NO_MLFLOW),
    (["promote", "--registered-model", "m"], NO_MLFLOW),
])
def test_no_server_is_one_line_and_no_guessed_server_is_contacted(
        decoys: list[str], image_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        args: list[str], message: str):
    monkeypatch.chdir(tmp_path)  # MLflow's own local store would appear here
    data = ["--data", str(image_folder())] if args[0] == "train" else []
    result = CliRunner().invoke(cli, [*args, *data])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert decoys == []  # nothing reached the servers a guess would have used
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_sync_without_mongo_is_one_line(decoys: list[str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    for follow in ("false", "true"):
        result = CliRunner().invoke(cli, ["sync", "--follow", follow])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [f"Error: {NO_MONGO}"]
    assert decoys == [] and not store.exists()


def test_train_in_a_real_process_exits_1_after_up_and_down(home: Path, image_folder):
    ports = ["--mlflow-port", str(free_port()), "--mongo-port", str(free_port())]
    assert cnnflow("up", "mlflow", *ports).exit_code == 0
    assert cnnflow("down").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MONGO_URI")}
    proc = subprocess.run([str(BIN / "cnnflow"), "train", "--data", str(image_folder()),
                           "--epochs", "1", "--weights", "none"],
                          capture_output=True, text=True, env=env, cwd=home, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"Error: {NO_MLFLOW}"]
    assert not (home / "mlruns").exists()


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every probe attempt (the health GET, a DNS look-up, a socket connect) is recorded and
    fails, so a URI that gets probed makes check_tracking_server raise."""
    seen: list[str] = []

    def refuse(what: str):
        def probe(*args, **kwargs):
            seen.append(what)
            raise ConnectionRefusedError(f"test: no {what} allowed")
        return probe

    monkeypatch.setattr(services, "_http_health", refuse("health check"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("DNS look-up"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("connection"))
    return seen


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "sqlite:///x.db", "databricks",
                                 "postgresql://u:p@db:5432/mlflow"])
def test_non_http_tracking_uris_are_not_probed(uri: str, probes: list[str]):
    services.check_tracking_server(uri, timeout=0.1)  # a probe would raise ServiceError
    assert probes == []


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5999", "HTTPS://mlflow.example.invalid"])
def test_http_tracking_uris_are_probed(uri: str, probes: list[str]):
    # The other half of the test above: the same trap catches the probe of a server URI.
    with pytest.raises(ServiceError, match="not reachable"):
        services.check_tracking_server(uri, timeout=0.1)
    assert probes


def test_unreachable_servers_fail_in_one_masked_line():
    port = free_port()
    with pytest.raises(ServiceError) as err:
        services.check_tracking_server(f"http://bob:{SECRET}@127.0.0.1:{port}", timeout=1)
    message = str(err.value)
    assert SECRET not in message and "bob:***@" in message and "\n" not in message
    assert "connection refused" in message and "cnnflow up" in message
    with pytest.raises(ServiceError) as err:
        services.check_mongo(f"mongodb://bob:{SECRET}@127.0.0.1:{port}/db", timeout=0.5)
    message = str(err.value)
    assert SECRET not in message and "\n" not in message and "MONGO_URI" in message


def test_session_fixtures_serve(mlflow_server: str, mongo_server: str,
                                monkeypatch: pytest.MonkeyPatch):
    # The session's servers live outside CNNFLOW_HOME: a stray `cnnflow down` leaves them be.
    assert cnnflow("down").exit_code == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MONGO_URI", mongo_server)
    services.check_tracking_server(services.tracking_uri())
    services.check_mongo(services.mongo_uri())
    assert MlflowClient(mlflow_server).create_experiment("fixture-check")
    with MongoClient(mongo_server, serverSelectionTimeoutMS=5000) as mongo:
        assert mongo.admin.command("ping")["ok"] == 1


def test_env_without_servers_is_one_line_error(home: Path):
    result = cnnflow("env")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: no cnnflow server is running: start them with `cnnflow up`"]


def test_env_prints_the_running_server_for_eval(mlflow_server: str, services_home: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CNNFLOW_HOME", str(services_home))
    result = cnnflow("env")
    assert result.exit_code == 0, result.output
    assert f"export MLFLOW_TRACKING_URI={mlflow_server}" in result.output.splitlines()


def test_env_exports_external_uris_unmasked_and_shell_quoted(home: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    # For eval: the password stays (only here), and shell characters survive the round trip.
    mongo = f"mongodb://alice:{SECRET}&x y@db.invalid:27017/cnnflow?authSource=admin"
    monkeypatch.setenv("MONGO_URI", mongo)
    result = cnnflow("env")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"export MONGO_URI='{mongo}'"]
    echoed = subprocess.run(["bash", "-c", 'eval "$EXPORTS"; printf %s "$MONGO_URI"'],
                            env={"EXPORTS": result.output, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, check=True)
    assert echoed.stdout == mongo
