"""Local services: an MLflow tracking server and a MongoDB-wire server, started on demand.

`up` starts, in the background, each service that is not configured elsewhere
(MLFLOW_TRACKING_URI / MONGO_URI); `down` stops only what `up` started, found by pid file under
`state_dir()`; `status` reports; `env_exports` gives the `export` lines that point MLflow's
own tools (`mlflow run`) at them. Each service is one `ServiceSpec` in `SERVICES`, so adding one
(the sync follower, say) is one more `register(...)` call, not another branch.

Which server a command uses (`service_uri`): the env var when set, else the server `up` started
(its record and a live pid), else a one-line ServiceError. Never a guessed default port.

Files per service under the state folder: `<name>.pid` (the process id, which is also its
process-group id), `<name>.json` (pid, url, host, port, started_at; 0600 when the url holds a
password), `logs/<name>.log`.

MLflow's backend store is a `Backend` (`BACKENDS`: sqlite, postgresql) or an existing database
(`up(backend_store_uri=...)`, logged into first). `postgresql` runs a PostgreSQL from the
state folder (`postgres/`, password in `postgres.password`, 0600) as its own service, started
a stage before MLflow and stopped after it; `LocalPostgres` is the same server for tests and
benchmarks, `postgres_uri()` its URI for `tune --storage auto`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from components.errors import CnnflowError, one_line
from components.settings import (
    DEFAULT_HOST,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_MONGO_PORT,
    DEFAULT_POSTGRES_PORT,
    mask_text,
    mask_uri,
    sqlalchemy_url,
    state_dir,
    url_backend,
)

STOP_GRACE_SECONDS = 10.0


class ServiceError(CnnflowError, RuntimeError):
    """A service cannot be started, stopped or reached; one line saying what to do about it."""


@dataclass(frozen=True)
class ServiceStatus:
    """What `up` / `down` / `status` report for one service (url has its password masked)."""

    name: str
    state: str  # "running", "unhealthy", "stopped" or "external"
    url: str
    pid: int | None = None
    log: Path | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service: its command, where it listens, and how to tell it is ready.

    `args(host, port, home)` returns the arguments after the executable; `url(host, port,
    home)` the address clients use; `health(url, timeout)` raises when the server does not
    answer yet. A service with no port (a follower process) leaves `default_port`, `url` and
    `health` None: it counts as ready as long as its process lives.

    The hooks a server with its own data folder needs (PostgreSQL): `locate(executable)` finds
    the program, `prepare(home)` readies its folder before each start and returns extra Popen
    keywords (the account to run as), `on_ready(url)` runs once it answers; `stage` orders the
    starts (a lower stage answers before the next one starts: MLflow needs its database), and
    `stop_signal` is what `down` sends first.
    """

    name: str
    label: str
    executable: str
    args: Callable[[str, int | None, Path], list[str]]
    env_var: str | None = None
    default_port: int | None = None
    port_option: str | None = None
    url: Callable[[str, int], str] | None = None
    health: Callable[[str, float], None] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    optional: bool = False  # started only when named (`cnnflow up --with-sync`)
    kind: str = ""  # what clients call it in "no <kind> server" ("MLflow", "MongoDB")
    locate: Callable[[str], str] | None = None  # default: the venv's bin, then PATH
    prepare: Callable[[Path], dict] | None = None
    on_ready: Callable[[str], None] | None = None
    stage: int = 1
    stop_signal: int = signal.SIGTERM
    stop_grace: float = STOP_GRACE_SECONDS


SERVICES: dict[str, ServiceSpec] = {}


def register(spec: ServiceSpec) -> ServiceSpec:
    """Add a service to the registry (in start order); returns it so it can be kept."""
    SERVICES[spec.name] = spec
    return spec


# --------------------------------------------------------------------------- health checks


def _url_host(host: str) -> str:
    """The host clients dial: a wildcard bind address is reached through loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _http_health(url: str, timeout: float, *, trust_env: bool = False) -> None:
    """GET <url>/health must answer 200 (MLflow's liveness endpoint)."""
    import requests

    with requests.Session() as session:
        # Local servers are reached directly; remote ones through the user's proxy settings.
        session.trust_env = trust_env
        response = session.get(url.rstrip("/") + "/health", timeout=timeout)
    if response.status_code != 200:
        raise ConnectionError(f"HTTP {response.status_code} from /health")


def _mongo_ping(uri: str, timeout: float) -> None:
    """The standard `ping` admin command, so a real mongod or Atlas answers it too."""
    from pymongo import MongoClient

    ms = max(int(timeout * 1000), 1)
    client = MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms)
    try:
        client.admin.command("ping")
    finally:
        client.close()


def short_reason(exc: BaseException, timeout: float) -> str:
    """Boil a driver's multi-line error down to a few words, password masked."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^\"'(),\]]+)", text)
    if found:
        return mask_text(found.group(1).strip().lower())
    name = type(exc).__name__
    if "Timeout" in name or "timed out" in text.lower():
        return f"no answer within {timeout:g} s"
    # pymongo appends its settings and a topology dump: keep what comes before them.
    first = one_line(re.split(r" \(configured timeouts|, Timeout: ", text)[0]) or name
    return mask_text(first[:160])


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it): for servers that tests and
    benchmarks start beside a user's own."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one readable line, when an http(s) tracking server is not up.

    file:, sqlite:, databricks and other non-HTTP URIs are not servers to probe: no-op.
    """
    if not re.match(r"^https?://", uri or "", re.IGNORECASE):
        return
    try:
        _http_health(uri, timeout, trust_env=True)
    except Exception as exc:  # any failure means "not usable"; say why in a few words
        raise ServiceError(
            f"MLflow tracking server at {mask_uri(uri)} is not reachable "
            f"({short_reason(exc, timeout)}): start it with `cnnflow up` "
            "or set MLFLOW_TRACKING_URI"
        ) from None


def check_mongo(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one readable line, when the MongoDB server behind `uri` does not answer."""
    try:
        _mongo_ping(uri, timeout)
    except Exception as exc:
        raise ServiceError(mongo_unreachable(uri, exc, timeout)) from None


def mongo_unreachable(uri: str, exc: BaseException, timeout: float) -> str:
    """The one line for a MongoDB that does not answer, instead of the driver's topology dump
    (also what the sync follower logs when Mongo goes away mid-pass)."""
    return (f"MongoDB at {mask_uri(uri)} is not reachable ({short_reason(exc, timeout)}): "
            "start it with `cnnflow up` or set MONGO_URI")


# --------------------------------------------------------------------------- PostgreSQL


POSTGRES_ROLE = "cnnflow"  # the superuser initdb creates; MLflow's database belongs to it
POSTGRES_SERVER_USER = "postgres"  # the account the server runs as when cnnflow runs as root


def postgres_binary(name: str) -> str:
    """Where a PostgreSQL program is: PATH first, then Debian's versioned folder (newest)."""
    found = shutil.which(name)
    if found:
        return found

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.parent.name))

    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=version)
    if candidates:
        return str(candidates[-1])
    raise ServiceError(f"PostgreSQL's `{name}` was not found on PATH or in "
                       "/usr/lib/postgresql/*/bin: install PostgreSQL (apt-get install "
                       "postgresql) or use `cnnflow up --backend-store-uri postgresql://...`")


def postgres_process_user() -> dict:
    """Popen keywords that run the server as a normal user: PostgreSQL refuses to run as
    root, so as root cnnflow runs it as the `postgres` account (Debian's package makes it)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam(POSTGRES_SERVER_USER)
    except KeyError:
        raise ServiceError(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: "
            "create one (useradd --system postgres) or run cnnflow as a normal user") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _hand_over(path: Path, who: dict) -> None:
    """Give `path` to the server's account (root only; a normal user owns it already)."""
    if who:
        os.chown(path, who["user"], who["group"])


def _reachable_by(folder: Path, who: dict) -> None:
    """As root, the server's account must be able to enter `folder` (every parent needs o+x)."""
    if not who:
        return
    probe = subprocess.run(["test", "-x", str(folder)], **who, check=False)
    if probe.returncode != 0:
        raise ServiceError(
            f"PostgreSQL runs as user `{POSTGRES_SERVER_USER}` (it refuses root), who cannot "
            f"enter {_show(folder)}: choose a CNNFLOW_HOME it can reach or make the parent "
            "folders traversable (chmod o+x)")


def new_password() -> str:
    """A random password that needs no quoting inside a URI (URL-safe base64 characters)."""
    import secrets

    return secrets.token_urlsafe(24)


def write_secret(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (0600 from the first byte on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def init_postgres(folder: Path, password: str, role: str = POSTGRES_ROLE) -> bool:
    """initdb into `folder` once (False when it holds a cluster already): superuser `role`
    with `password`, scram-sha-256 for every connection, so nothing gets in without it."""
    folder = Path(folder)
    if (folder / "PG_VERSION").is_file():
        return False
    who = postgres_process_user()
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ServiceError(f"{_show(folder)} is neither empty nor a PostgreSQL data folder: "
                           "move it away and run `cnnflow up --backend postgresql` again")
    _reachable_by(folder.parent, who)
    _hand_over(folder, who)
    folder.chmod(0o700)
    pwfile = folder.parent / f".{folder.name}.pwfile"  # the server's account must read it
    write_secret(pwfile, password + "\n")
    _hand_over(pwfile, who)
    try:
        done = subprocess.run(
            [postgres_binary("initdb"), "-D", str(folder), "-U", role, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
            capture_output=True, text=True, check=False, **who)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        last = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise ServiceError(f"initdb failed in {_show(folder)}"
                           + (f" ({mask_text(last[-1][:200])})" if last else ""))
    return True


# A throwaway server (tests, benchmarks) need not survive a power cut: no fsync, no waiting.
NOT_DURABLE = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def postgres_args(folder: Path, host: str, port: int, durable: bool = True) -> list[str]:
    """The server's arguments: TCP on host:port only (no Unix socket in a shared folder)."""
    extra = [] if durable else [arg for setting in NOT_DURABLE for arg in ("-c", setting)]
    return ["-D", str(folder), "-h", host, "-p", str(port), "-c", "unix_socket_directories=",
            "-c", "logging_collector=off", *extra]


def postgres_url(host: str, port: int, password: str | None, dbname: str,
                 role: str = POSTGRES_ROLE) -> str:
    """postgresql://role:password@host:port/dbname (SQLAlchemy reads it through psycopg2)."""
    auth = f"{role}:{password}" if password else role
    return f"postgresql://{auth}@{_url_host(host)}:{port}/{dbname}"


def _pg_connect(uri: str, timeout: float):
    """A psycopg2 connection; libpq reads only postgresql://, so a `+driver` is dropped."""
    import psycopg2

    libpq_uri = re.sub(r"^(postgres(?:ql)?)\+[^:]*:", r"\1:", uri, flags=re.IGNORECASE)
    return psycopg2.connect(libpq_uri, connect_timeout=max(int(round(timeout)), 1))


def _pg_ping(uri: str, timeout: float) -> None:
    """A session that logs in and runs SELECT 1: the password and the database are right."""
    conn = _pg_connect(uri, timeout)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def create_database(uri: str, dbname: str, timeout: float = 10.0) -> bool:
    """CREATE DATABASE `dbname` on the server behind `uri` unless it exists (True if made)."""
    from psycopg2 import sql

    conn = _pg_connect(uri, timeout)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            return True
    finally:
        conn.close()


def check_postgres(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one masked line, when the PostgreSQL behind `uri` cannot be used
    (down, wrong password, no such database)."""
    try:
        _pg_ping(uri, timeout)
    except Exception as exc:
        raise ServiceError(
            f"PostgreSQL at {mask_uri(uri)} is not usable ({_pg_reason(exc, timeout)}): "
            "check the URI, or let cnnflow run one with `cnnflow up --backend postgresql`"
        ) from None


def _pg_reason(exc: BaseException, timeout: float) -> str:
    """libpq's multi-line message as a few words: its FATAL line, else its last line."""
    text = str(exc)
    fatal = re.findall(r"FATAL:\s*(.+)", text)
    if fatal:
        return mask_text(fatal[-1].strip()[:160])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "timeout expired" in text:
        return f"no answer within {max(int(round(timeout)), 1)} s"
    if lines and "refused" in text:
        return "connection refused"
    return mask_text(lines[-1][:160]) if lines else type(exc).__name__


@dataclass
class LocalPostgres:
    """A PostgreSQL server in `folder`, run in the foreground of its own process group.

    For tests and benchmarks (a throwaway server) and the bones of `cnnflow up --backend
    postgresql`. `uri(dbname)` creates the database on first use and returns its full URI.
    """

    folder: Path
    port: int
    password: str
    host: str = DEFAULT_HOST
    role: str = POSTGRES_ROLE
    log: Path | None = None
    durable: bool = True  # False: fsync off, for a server thrown away afterwards
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        """initdb (first time), start the server and wait until it accepts the password."""
        init_postgres(self.folder, self.password, self.role)
        log = self.log or self.folder.parent / f"{self.folder.name}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [postgres_binary("postgres"),
                 *postgres_args(self.folder, self.host, self.port, self.durable)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **postgres_process_user())
        deadline = time.monotonic() + timeout
        while True:
            try:
                _pg_ping(self.uri_of("postgres"), 2.0)
                return self
            except Exception as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(
                        f"PostgreSQL in {_show(self.folder)} did not start "
                        f"({_last_log_line(log) or _pg_reason(exc, timeout)}) "
                        f"(log: {_show(log)})") from None
                time.sleep(0.2)

    def uri_of(self, dbname: str) -> str:
        """The URI of `dbname` on this server, password included (mask it before printing)."""
        return postgres_url(self.host, self.port, self.password, dbname, self.role)

    def uri(self, dbname: str = "postgres") -> str:
        """The URI of database `dbname`, created on first use."""
        create_database(self.uri_of("postgres"), dbname)
        return self.uri_of(dbname)

    def stop(self) -> None:
        """A fast shutdown (SIGINT, as `pg_ctl stop -m fast`): clients cut, data flushed."""
        if self.proc is not None:
            stop_postgres(self.proc.pid)
            self.proc = None


def stop_postgres(pid: int, grace: float = 30.0) -> None:
    """SIGINT (PostgreSQL's fast shutdown) to the server's group, SIGKILL only after `grace`."""
    _stop(pid, grace, first=signal.SIGINT)


# --------------------------------------------------------------------------- the registry


def _venv_executable(name: str) -> str:
    """Prefer the command installed next to this Python (the project's venv), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ServiceError(
        f"command `{name}` not found next to {sys.executable} or on PATH; "
        "install cnnflow's dependencies (pip install -e .)"
    )


POSTGRES_DATABASE = "mlflow"  # the database `up --backend postgresql` gives MLflow


def _password_file(home: Path) -> Path:
    return home / "postgres.password"


def _read_password(home: Path | None) -> str | None:
    if home is None:
        return None
    try:
        return _password_file(Path(home)).read_text().strip() or None
    except OSError:
        return None


def _prepare_postgres(home: Path) -> dict:
    """Before each start: a password (made once, 0600) and a cluster (initdb, first time)."""
    folder = home / "postgres"
    password = _read_password(home)
    if password is None:
        if (folder / "PG_VERSION").is_file():
            raise ServiceError(
                f"{_show(_password_file(home))} is missing, and the PostgreSQL data in "
                f"{_show(folder)} needs it: restore it, or move {_show(folder)} away to start "
                "afresh")
        password = new_password()
        write_secret(_password_file(home), password + "\n")
    who = postgres_process_user()
    _reachable_by(home, who)
    init_postgres(folder, password)
    return who


def _maintenance_url(url: str) -> str:
    """The same server's `postgres` database: there whenever the server is, to create others."""
    base, _, query = url.partition("?")
    return base.rsplit("/", 1)[0] + "/postgres" + (f"?{query}" if query else "")


register(ServiceSpec(
    name="postgres",
    label="PostgreSQL server (MLflow's backend store)",
    executable="postgres",
    locate=postgres_binary,
    args=lambda host, port, home: postgres_args(home / "postgres", host, port),
    kind="PostgreSQL",
    default_port=DEFAULT_POSTGRES_PORT,
    port_option="--postgres-port",
    url=lambda host, port, home=None: postgres_url(host, port, _read_password(home),
                                                  POSTGRES_DATABASE),
    health=lambda url, timeout: _pg_ping(_maintenance_url(url), timeout),
    on_ready=lambda url: create_database(_maintenance_url(url), POSTGRES_DATABASE) and None,
    prepare=_prepare_postgres,
    optional=True,  # started by `up --backend postgresql` (or `up postgres`)
    stage=0,  # answers before MLflow starts on it
    stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown, as `pg_ctl stop -m fast`
    stop_grace=30.0,
))


register(ServiceSpec(
    name="mlflow",
    label="MLflow tracking server",
    executable="mlflow",
    # The backend store comes in MLFLOW_BACKEND_STORE_URI (see `up`): it may hold a
    # password, which a command line would show to every user of the machine.
    args=lambda host, port, home: [
        "server",
        "--artifacts-destination", str(home / "artifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ],
    env_var="MLFLOW_TRACKING_URI",
    kind="MLflow",
    default_port=DEFAULT_MLFLOW_PORT,
    port_option="--mlflow-port",
    url=lambda host, port, home=None: f"http://{_url_host(host)}:{port}",
    health=_http_health,
    # No telemetry from what the project starts. MLflow's GenAI job runner (7 extra
    # huey processes, ~2 s of start-up) serves nothing cnnflow does, so it stays off.
    env={"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
))

register(ServiceSpec(
    name="mongo",
    label="MongoDB-wire server (secantusd-py)",
    # secantusdb is GPL-2.0: run as its own process, never imported.
    executable="secantusd-py",
    args=lambda host, port, home: [
        "--host", host, "--port", str(port), "--storage-path", str(home / "mongo"),
    ],
    env_var="MONGO_URI",
    kind="MongoDB",
    default_port=DEFAULT_MONGO_PORT,
    port_option="--mongo-port",
    url=lambda host, port, home=None: f"mongodb://{_url_host(host)}:{port}",
    health=_mongo_ping,
))


register(ServiceSpec(
    name="sync",
    label="Mongo mirror follower (cnnflow sync --follow)",
    executable="cnnflow",
    # No port: it runs as long as its process lives; it reads MLFLOW_TRACKING_URI / MONGO_URI,
    # else the servers `up` recorded under CNNFLOW_HOME (set by _start).
    args=lambda host, port, home: ["sync", "--follow"],
    env={"MLFLOW_DISABLE_TELEMETRY": "true"},
    optional=True,
))


def default_names() -> list[str]:
    """What a bare `cnnflow up` starts: every service not marked optional."""
    return [s.name for s in SERVICES.values() if not s.optional]


# --------------------------------------------------------------------------- files and processes


def _home(home: Path | None) -> Path:
    return Path(home).resolve() if home is not None else state_dir()


def _pid_file(home: Path, name: str) -> Path:
    return home / f"{name}.pid"


def _record_file(home: Path, name: str) -> Path:
    return home / f"{name}.json"


def _log_file(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_pid(home: Path, name: str) -> int | None:
    try:
        return int(_pid_file(home, name).read_text().strip())
    except (OSError, ValueError):
        return None


def _read_record(home: Path, name: str) -> dict:
    try:
        data = json.loads(_record_file(home, name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _forget(home: Path, name: str) -> None:
    for path in (_pid_file(home, name), _record_file(home, name)):
        path.unlink(missing_ok=True)


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state, ppid, pgrp, ...); None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """True while the process runs (zombies count as gone; our own children get reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fine, ask the kernel below
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return not (stat and stat[0] == "Z")


def _group_alive(pgid: int) -> bool:
    """True while any live process is left in the process group (MLflow forks workers)."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat and stat[0] != "Z" and int(stat[2]) == pgid:
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ours(pid: int, spec: ServiceSpec) -> bool:
    """Guard against pid reuse: the process must still be running the service's command."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return spec.executable in cmdline


def _running_pid(home: Path, spec: ServiceSpec) -> int | None:
    """The pid from our pid file when that process is alive and still the service; else None."""
    pid = _read_pid(home, spec.name)
    if pid is not None and _alive(pid) and _is_ours(pid, spec):
        return pid
    return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        try:  # leader gone, but its workers may still hold the group
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(pid: int, grace: float = STOP_GRACE_SECONDS, first: int = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to the process group, wait up to `grace` seconds, then SIGKILL."""
    _signal_group(pid, first)
    for sig, wait in ((signal.SIGKILL, grace), (None, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _alive(pid)  # reaps the leader when it is our own child
            if not _group_alive(pid):
                return
            time.sleep(0.1)
        if sig is not None:
            _signal_group(pid, sig)


def stop_process_group(pid: int, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop a child started in its own process group, workers included (`cnnflow dashboard`
    uses it for Streamlit): SIGTERM, then SIGKILL after `grace` seconds."""
    _stop(pid, grace)


def _clean_stale(home: Path, spec: ServiceSpec) -> None:
    """Drop a pid file whose process is gone, and any workers it left in its group."""
    pid = _read_pid(home, spec.name)
    if pid is not None and not _alive(pid) and _group_alive(pid):
        _stop(pid, grace=2.0)
    _forget(home, spec.name)


def _port_problem(spec: ServiceSpec, host: str, port: int, log: Path) -> str | None:
    """Why `host:port` cannot be listened on, as a one-line message; None when it is free."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            sock.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = f"`cnnflow up {spec.port_option} {port + 1}`" if spec.port_option else (
                "`cnnflow up` with another port")
            return (f"{spec.name}: port {port} on {host} is already in use by another program; "
                    f"stop it or run {hint} (log: {_show(log)})")
        return (f"{spec.name}: cannot listen on {host}:{port} ({short_reason(exc, 0)}); "
                f"check --host (log: {_show(log)})")
    return None


def _last_log_line(log: Path) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("--- cnnflow")]
    return mask_text(lines[-1][:200]) if lines else ""


def _select(names: Iterable[str] | None) -> list[ServiceSpec]:
    if names is None:
        return list(SERVICES.values())
    wanted = list(dict.fromkeys(names)) or list(SERVICES)
    unknown = [n for n in wanted if n not in SERVICES]
    if unknown:
        raise ServiceError(f"unknown service {unknown[0]!r}; choose from {', '.join(SERVICES)}")
    return [SERVICES[n] for n in wanted]


def _healthy(spec: ServiceSpec, url: str, timeout: float) -> bool:
    if spec.health is None:
        return True
    try:
        spec.health(url, timeout)
    except Exception:
        return False
    return True


def _external(spec: ServiceSpec) -> str | None:
    return os.environ.get(spec.env_var) if spec.env_var else None


# --------------------------------------------------------------------------- public API


def service_uri(name: str, home: Path | None = None) -> str:
    """Where clients find service `name`: its env var, else the server `up` started while its
    process lives; else a one-line ServiceError. Never a default port: another program (a
    colleague's MLflow, an old mongod) may listen there, and runs would land in it unseen."""
    spec = _select([name])[0]
    external = _external(spec)
    if external:
        return external
    url = _recorded_url(_home(home), spec)
    if url:
        return url
    if spec.env_var is None:
        raise ServiceError(f"{spec.name} has no address: it is a process, not a server")
    raise ServiceError(f"no {spec.kind} server: run `cnnflow up` or set {spec.env_var}")


def _recorded_url(home: Path, spec: ServiceSpec) -> str:
    """The url `up` recorded for `spec` while its process lives; "" when it is not running."""
    if _running_pid(home, spec) is None:
        return ""
    return str(_read_record(home, spec.name).get("url", ""))


def export_line(name: str, value: str) -> str:
    """`export NAME=value`, shell-quoted, so `eval` in the user's shell reads it back exactly."""
    return f"export {name}={shlex.quote(value)}"


def env_exports(home: Path | None = None) -> list[str]:
    """`export VAR=uri` for each server in use (its env var, else the one `up` runs), so
    `eval "$(cnnflow env)"` points `mlflow run` and MLflow's other tools at cnnflow's servers.

    Not masked: the lines are for eval. Raises ServiceError when no server is running or set.
    """
    home = _home(home)
    lines = []
    for spec in SERVICES.values():
        if spec.env_var is None:
            continue
        uri = _external(spec) or _recorded_url(home, spec)
        if uri:
            lines.append(export_line(spec.env_var, uri))
    if not lines:
        raise ServiceError("no cnnflow server is running: start them with `cnnflow up`")
    return lines


def started_exports(items: Iterable[ServiceStatus]) -> list[str]:
    """The `export` lines for the servers `up` runs (external ones are in the environment
    already, and their URIs may hold a password: never printed)."""
    lines = []
    for item in items:
        var = SERVICES[item.name].env_var if item.name in SERVICES else None
        if var and item.state == "running" and item.pid is not None and item.url:
            lines.append(export_line(var, item.url))
    return lines


def _is_local_store(uri: str) -> bool:
    """A folder or SQLite file (what MLflow falls back to when nothing is exported)."""
    return bool(re.match(r"^(sqlite|file):", uri, re.IGNORECASE)
                or not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri))


def local_store_note(uri: str, home: Path | None = None) -> str:
    """One line when `uri` is a local store while the MLflow server `up` started is running:
    `mlflow run` with nothing exported tracks to MLflow's default store, which no UI shows.

    "" otherwise (a server URI, or no cnnflow server running).
    """
    if not uri or not _is_local_store(uri):
        return ""
    url = _recorded_url(_home(home), SERVICES["mlflow"])
    if not url:
        return ""
    default = uri == "sqlite:///mlflow.db" or Path(uri.rstrip("/")).name == "mlruns"
    what = "MLflow's default store" if default else "a local store"
    return (f"note: tracking to {mask_uri(uri)} ({what}), not the cnnflow server at "
            f"{mask_uri(url)} that is running: eval \"$(cnnflow env)\" and run again")


def tracking_uri(home: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the local server `up` started; else ServiceError (one line)."""
    return service_uri("mlflow", home)


def mongo_uri(home: Path | None = None) -> str:
    """MONGO_URI, else the local server `up` started; else ServiceError (one line)."""
    return service_uri("mongo", home)


def postgres_uri(home: Path | None = None) -> str | None:
    """The URI (password included) of the PostgreSQL `cnnflow up --backend postgresql` runs,
    database `mlflow`; None when it is not running. For `tune --storage auto`: mask it before
    printing. Another database on that server: replace the path (`create_database` makes it)."""
    return _recorded_url(_home(home), SERVICES["postgres"]) or None


@dataclass(frozen=True)
class Backend:
    """Where the MLflow server `up` starts keeps its runs: `store(home)` gives the backend
    store URI, once the local server it `needs` (started first) answers."""

    name: str
    store: Callable[[Path], str]
    needs: str | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add a choice for `cnnflow up --backend`; returns it so it can be kept."""
    BACKENDS[backend.name] = backend
    return backend


register_backend(Backend("sqlite", lambda home: f"sqlite:///{home / 'mlflow.db'}"))
register_backend(Backend("postgresql", lambda home: postgres_uri(home) or "", needs="postgres"))

# Checks of a `--backend-store-uri` by scheme (before `+driver`): one line before any start.
STORE_CHECKS: dict[str, Callable[[str, float], None]] = {
    "postgresql": check_postgres,
    "postgres": check_postgres,
}

EXPLICIT_STORE = "uri"  # the backend name recorded for `up --backend-store-uri`


def check_store(uri: str, timeout: float = 10.0) -> None:
    """Probe an existing backend store (PostgreSQL: log in) so a wrong host or password is one
    masked line before MLflow starts on it; stores without a check pass through."""
    check = STORE_CHECKS.get(url_backend(uri))
    if check is not None:
        check(uri, timeout)


def status(names: Iterable[str] | None = None, home: Path | None = None,
           timeout: float = 2.0) -> list[ServiceStatus]:
    """Each service as running / unhealthy (process up, not answering) / stopped / external."""
    home = _home(home)
    result = []
    for spec in _select(names):
        external = _external(spec)
        log = _log_file(home, spec.name)
        if external:
            result.append(ServiceStatus(spec.name, "external", mask_uri(external)))
            continue
        pid = _running_pid(home, spec)
        if pid is None:
            result.append(ServiceStatus(spec.name, "stopped", "", None,
                                        log if log.exists() else None))
            continue
        url = str(_read_record(home, spec.name).get("url", ""))
        state = "running" if _healthy(spec, url, timeout) else "unhealthy"
        result.append(ServiceStatus(spec.name, state, mask_uri(url), pid, log))
    return result


def _start(spec: ServiceSpec, host: str, port: int | None, home: Path,
           env: Mapping[str, str] | None = None, note: Mapping[str, str] | None = None,
           ) -> tuple[subprocess.Popen, str]:
    """Launch one service in its own session, logging to logs/<name>.log; record pid and url.

    `env` adds variables (MLflow's store URI); `note` adds masked fields to the record and the
    log's header. A record whose url holds a password is written 0600.
    """
    command = [(spec.locate or _venv_executable)(spec.executable),
               *spec.args(host, port, home)]
    extra = spec.prepare(home) if spec.prepare is not None else {}
    url = spec.url(host, port, home) if spec.url is not None and port is not None else ""
    log = _log_file(home, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    # CNNFLOW_HOME: a follower started here finds the servers `up` recorded in this folder.
    full_env = {**os.environ, **spec.env, **(env or {}), "CNNFLOW_HOME": str(home)}
    shown = "".join(f" ({key} {value})" for key, value in (note or {}).items())
    with open(log, "ab") as out:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"--- cnnflow up {stamp}: {' '.join(command)}{shown}\n".encode())
        out.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=home, env=full_env,
                                start_new_session=True, **extra)
    _pid_file(home, spec.name).write_text(f"{proc.pid}\n")
    record = {"name": spec.name, "pid": proc.pid, "url": url, "host": host, "port": port,
              "started_at": time.time(), "log": str(log), **(note or {})}
    text = json.dumps(record, indent=2) + "\n"
    if mask_uri(url) != url:
        write_secret(_record_file(home, spec.name), text)
    else:
        _record_file(home, spec.name).write_text(text)
    return proc, url


def _mlflow_backend(home: Path, backend: str | None, store_uri: str | None) -> str:
    """The backend MLflow runs (or is to run) on: the one asked for, else the one the running
    server records, else sqlite. A running server on another one is a one-line error."""
    if backend is not None and store_uri:
        raise ServiceError("give either --backend or --backend-store-uri, not both")
    wanted = EXPLICIT_STORE if store_uri else backend
    if wanted is not None and wanted != EXPLICIT_STORE and wanted not in BACKENDS:
        raise ServiceError(f"unknown backend {wanted!r}; choose from {', '.join(BACKENDS)}")
    spec = SERVICES["mlflow"]
    if _external(spec) or _running_pid(home, spec) is None:
        return wanted or "sqlite"
    record = _read_record(home, "mlflow")
    running = str(record.get("backend", "sqlite"))
    same = wanted is None or (running == wanted and (
        not store_uri or record.get("store") == mask_uri(store_uri)))
    if not same:
        raise ServiceError(
            f"mlflow is already running on {record.get('store') or running}: "
            "stop it with `cnnflow down mlflow` first, then run `cnnflow up` again")
    return running


def up(host: str = DEFAULT_HOST, mlflow_port: int = DEFAULT_MLFLOW_PORT,
       mongo_port: int = DEFAULT_MONGO_PORT, timeout: float = 90, *,
       names: Iterable[str] | None = None, ports: Mapping[str, int] | None = None,
       home: Path | None = None, backend: str | None = None,
       backend_store_uri: str | None = None) -> list[ServiceStatus]:
    """Start every service (or those in `names`) that is neither external nor already running.

    MLflow's store: `backend` (a BACKENDS name, sqlite by default; postgresql also starts the
    `postgres` service) or an existing database at `backend_store_uri` (probed first).
    Services start in stages (PostgreSQL answers before MLflow starts); within a stage all are
    launched before any is waited for, so the slow MLflow start overlaps Mongo's. A service
    that dies or stays silent past `timeout` seconds is stopped and reported in a ServiceError
    naming its log; the ones that came up are left running, later stages are not started.
    """
    home = _home(home)
    home.mkdir(parents=True, exist_ok=True)
    port_of = {"mlflow": mlflow_port, "mongo": mongo_port, **(ports or {})}
    specs = _select(names) if names is not None else [
        s for s in SERVICES.values() if not s.optional]
    chosen = _mlflow_backend(home, backend, backend_store_uri)
    mlflow_spec = SERVICES["mlflow"]
    if mlflow_spec in specs and not _external(mlflow_spec):
        needs = BACKENDS[chosen].needs if chosen in BACKENDS else None
        if needs and SERVICES[needs] not in specs:
            specs = [SERVICES[needs], *specs]
    specs = [s for s in SERVICES.values() if s in specs]  # registry order
    done: dict[str, ServiceStatus] = {}
    # name -> (spec, pid, url, Popen when we started it now)
    running: dict[str, tuple[ServiceSpec, int, str, subprocess.Popen | None]] = {}
    to_start: list[tuple[ServiceSpec, int | None]] = []

    for spec in specs:
        external = _external(spec)
        if external:
            done[spec.name] = ServiceStatus(spec.name, "external", mask_uri(external))
            continue
        pid = _running_pid(home, spec)
        if pid is not None:
            url = str(_read_record(home, spec.name).get("url", ""))
            running[spec.name] = (spec, pid, url, None)
            continue
        _clean_stale(home, spec)
        port = port_of.get(spec.name, spec.default_port)
        if port is not None:
            problem = _port_problem(spec, host, port, _log_file(home, spec.name))
            if problem:
                raise ServiceError(problem)
        to_start.append((spec, port))
    if backend_store_uri and any(spec is mlflow_spec for spec, _ in to_start):
        check_store(backend_store_uri, min(timeout, 10.0))

    for stage in sorted({spec.stage for spec in specs}):
        waiting = {name: item for name, item in running.items() if item[0].stage == stage}
        started: list[tuple[ServiceSpec, subprocess.Popen]] = []
        try:
            for spec, port in to_start:
                if spec.stage != stage:
                    continue
                env, note = {}, {}
                if spec is mlflow_spec:
                    store = backend_store_uri or BACKENDS[chosen].store(home)
                    env = {"MLFLOW_BACKEND_STORE_URI": sqlalchemy_url(store)}
                    note = {"backend": chosen, "store": mask_uri(store)}
                proc, url = _start(spec, host, port, home, env, note)
                started.append((spec, proc))
                waiting[spec.name] = (spec, proc.pid, url, proc)
        except BaseException:
            for spec, proc in started:
                _stop(proc.pid, spec.stop_grace, spec.stop_signal)
                _forget(home, spec.name)
            raise
        errors = _wait(waiting, home, timeout, done)
        if errors:
            raise ServiceError("; ".join(errors))
    return [done[spec.name] for spec in specs]


def _wait(waiting: dict[str, tuple[ServiceSpec, int, str, subprocess.Popen | None]],
          home: Path, timeout: float, done: dict[str, ServiceStatus]) -> list[str]:
    """Wait until each service answers (then run its on_ready), dies or runs out of time;
    the ones that answered go into `done`, the others come back as one message each."""
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while waiting:
        for name, (spec, pid, url, proc) in list(waiting.items()):
            log = _log_file(home, name)
            exited = proc.poll() is not None if proc is not None else not _alive(pid)
            if exited:
                del waiting[name]
                _forget(home, name)
                code = f" with code {proc.returncode}" if proc is not None else ""
                last = _last_log_line(log)
                errors.append(f"{name}: the {spec.label} exited during start-up{code}"
                              + (f" ({last})" if last else "") + f" (log: {_show(log)})")
            elif _healthy(spec, url, min(1.0, max(deadline - time.monotonic(), 0.1))):
                del waiting[name]
                try:
                    if spec.on_ready is not None:
                        spec.on_ready(url)
                except Exception as exc:
                    errors.append(f"{name}: the {spec.label} answers but could not be set up "
                                  f"({short_reason(exc, timeout)}) (log: {_show(log)})")
                    continue
                done[name] = ServiceStatus(name, "running", mask_uri(url), pid, log)
        if not waiting:
            break
        if time.monotonic() >= deadline:
            for name, (spec, pid, url, proc) in waiting.items():
                log = _log_file(home, name)
                if proc is not None:
                    _stop(pid, spec.stop_grace, spec.stop_signal)
                    _forget(home, name)
                    errors.append(
                        f"{name}: the {spec.label} did not answer at {mask_uri(url)} within "
                        f"{timeout:g} s and was stopped; see the log or retry with "
                        f"`cnnflow up --timeout {max(2 * timeout, 30):g}` (log: {_show(log)})")
                else:
                    errors.append(
                        f"{name}: running as pid {pid} but not answering at {mask_uri(url)}; "
                        f"run `cnnflow down` then `cnnflow up` (log: {_show(log)})")
            break
        time.sleep(0.2)
    return errors


def down(names: Iterable[str] | None = None, home: Path | None = None) -> list[ServiceStatus]:
    """Stop what `up` started (by pid file, whole process group); external servers are untouched.

    In reverse start order, so MLflow lets go of PostgreSQL before PostgreSQL shuts down.
    """
    home = _home(home)
    specs = _select(names)
    for spec in reversed([s for s in SERVICES.values() if s in specs]):
        pid = _running_pid(home, spec)
        if pid is not None:
            _stop(pid, spec.stop_grace, spec.stop_signal)
        _clean_stale(home, spec)
    result = []
    for spec in specs:
        external = _external(spec)
        log = _log_file(home, spec.name)
        if external:
            result.append(ServiceStatus(spec.name, "external", mask_uri(external)))
        else:
            result.append(ServiceStatus(spec.name, "stopped", "", None,
                                        log if log.exists() else None))
    return result


def format_status(item: ServiceStatus) -> str:
    """One aligned line for the command line: name, state, url, pid, log."""
    line = f"{item.name:<7} {item.state:<9} {item.url or '-'}"
    if item.pid is not None:
        line += f"  pid {item.pid}"
    if item.log is not None:
        line += f"  log {_show(item.log)}"
    return line
