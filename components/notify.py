"""Alerts through apprise: a training run or pipeline finished or failed, a run died, a new
`@champion`, a tune finished, sent to Slack, Discord, Teams, Telegram, e-mail or any JSON
webhook (every service apprise knows, by its URL).

Why here, and why so careful: long runs are watched from a phone, and an alert must never cost
the run anything. So delivery is bounded (each target on its own daemon thread, the caller
waits at most `timeout` seconds in all, apprise retries within that budget and its sockets time
out inside it), nothing raises into the caller, and a target's URL is masked in every line
cnnflow prints (`mask`). Configuration: `CNNFLOW_NOTIFY` (one or more apprise URLs), else
`notify.yaml` under the state folder, else off: no guessed default. A leaf module (settings,
errors, humanize; apprise imported on use), so any layer above the leaves may call it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from components import humanize
from components.errors import CnnflowError, one_line
from components.settings import mask_text, state_dir

ENV_URLS = "CNNFLOW_NOTIFY"  # one or more apprise URLs, separated by commas or spaces
ENV_TIMEOUT = "CNNFLOW_NOTIFY_TIMEOUT"  # overrides notify.yaml's `timeout`
CONFIG_FILE = "notify.yaml"
DEFAULT_TIMEOUT = 20.0  # seconds an alert may hold up its caller, every target and retry in
DEFAULT_RETRIES = 2  # extra attempts per target, inside the timeout
RETRY_WAIT = 0.5  # seconds between attempts (apprise's `wait`)
CONFIG_KEYS = ("urls", "timeout", "retries")
# Field of a run's mirror `status` document: the died alert went out (or was claimed), so a
# restarted or second sync follower does not send it again.
DIED_FLAG = "notified_died"
# Metrics an alert shows when the run has them, first found first.
KEY_METRICS = ("test_acc", "best_val_acc", "val_acc")
# MLflow run status -> apprise notify type. Other statuses (KILLED: someone pressed Ctrl-C or
# stopped it on purpose) send nothing.
RUN_LEVELS = {"FINISHED": "success", "FAILED": "failure"}

logger = logging.getLogger("cnnflow.notify")
_MUTED: contextvars.ContextVar[bool] = contextvars.ContextVar("cnnflow_notify_muted",
                                                              default=False)
_F = TypeVar("_F", bound=Callable[..., Any])


class NotifyError(CnnflowError, ValueError):
    """The alert configuration cannot be used; one line naming where it came from."""


@dataclass(frozen=True)
class Config:
    """Where alerts go, and how long sending them may take."""

    urls: tuple[str, ...] = field(repr=False)  # raw: tokens inside; print `targets`
    source: str  # "CNNFLOW_NOTIFY" or the notify.yaml path
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @property
    def targets(self) -> list[str]:
        return [mask(url) for url in self.urls]

    def attempt_seconds(self) -> float:
        """Connect and read timeout of one attempt: every attempt, its connect and its read,
        plus the waits between them, fits in `timeout`, so no request is still open when the
        caller stops waiting (and none holds up the end of the process)."""
        budget = (self.timeout - self.retries * self.wait()) / (self.retries + 1)
        return max(0.1, budget / 2)

    def wait(self) -> float:
        return min(RETRY_WAIT, self.timeout / (10 * max(1, self.retries)))


@dataclass(frozen=True)
class Message:
    """One alert: `event` names it (finished, failed, died, champion, tune, test)."""

    event: str
    title: str
    body: str
    level: str = "info"  # apprise NotifyType: info, success, warning, failure


@dataclass(frozen=True)
class Delivery:
    """What became of one message at one target (masked)."""

    target: str
    ok: bool
    seconds: float
    reason: str = ""  # one masked line when not ok


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def config_path() -> Path:
    """`notify.yaml` in the state folder (`CNNFLOW_HOME`, `.cnnflow/` by default)."""
    return state_dir() / CONFIG_FILE


def enabled() -> bool:
    """Alerts are configured and not `muted` here (cheap: no file is parsed, apprise is not
    imported), so a caller may skip gathering what an alert would say."""
    if _MUTED.get():
        return False
    return bool(os.environ.get(ENV_URLS, "").strip()) or config_path().is_file()


def load_config() -> Config | None:
    """The configured targets, or None when alerts are off; NotifyError (one line, URLs
    masked) when the configuration cannot be used."""
    env = os.environ.get(ENV_URLS, "").strip()
    path = config_path()
    if env:
        urls, source, file_values = split_urls(env), ENV_URLS, _read_file(path, need=False)
    elif path.is_file():
        file_values = _read_file(path, need=True)
        urls, source = file_values.get("urls", []), str(path)
    else:
        return None
    if not urls:
        raise NotifyError(f"{source} names no URL: list apprise URLs under `urls:`, or "
                          f"remove the file")
    timeout = os.environ.get(ENV_TIMEOUT) or file_values.get("timeout", DEFAULT_TIMEOUT)
    retries = file_values.get("retries", DEFAULT_RETRIES)
    try:
        timeout, retries = float(timeout), int(retries)
    except (TypeError, ValueError):
        raise NotifyError(f"alert timeout '{timeout}' / retries '{retries}' are not numbers: "
                          f"set them in {path} or {ENV_TIMEOUT}") from None
    if not 0 < timeout <= 600 or not 0 <= retries <= 10:
        raise NotifyError(f"alert timeout must be in (0, 600] s and retries in [0, 10] "
                          f"(got {timeout:g}, {retries}): fix {path} or {ENV_TIMEOUT}")
    config = Config(tuple(urls), source, timeout, retries)
    for url in config.urls:
        check_url(url, source)
    return config


def split_urls(text: str) -> list[str]:
    """apprise URLs in one string, separated by commas or spaces (apprise's own parser: a
    comma inside a URL's query, `?to=a@x.org,b@x.org`, stays in that URL)."""
    from apprise.utils.parse import parse_urls

    return [u for u in parse_urls(text) if u]


def _read_file(path: Path, need: bool) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NotifyError(f"cannot read {path} ({type(exc).__name__}): write `urls:` as a "
                          "YAML list of apprise URLs") from None
    if not isinstance(values, dict):
        raise NotifyError(f"{path} is not a mapping: write `urls:` as a list of apprise URLs")
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise NotifyError(f"{path}: unknown key '{unknown[0]}': use {', '.join(CONFIG_KEYS)}")
    urls = values.get("urls", [])
    urls = split_urls(urls) if isinstance(urls, str) else urls
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise NotifyError(f"{path}: `urls` must be a list of apprise URLs")
    if need and not urls:
        raise NotifyError(f"{path} names no URL: list apprise URLs under `urls:`")
    return {**values, "urls": urls}


def check_url(url: str, source: str = "the URL") -> None:
    """apprise knows the service and the URL is complete, or a one-line NotifyError."""
    if _plugin(url, None) is None:
        raise NotifyError(f"{source}: '{mask(url)}' is not a URL apprise can send to (unknown "
                          "service or missing parts): see https://github.com/caronc/apprise/wiki")


def add_url(url: str) -> Path:
    """Append `url` to notify.yaml (created with permissions 0600: it holds tokens)."""
    import yaml

    check_url(url)
    path = config_path()
    values = _read_file(path, need=False)
    if url in values.get("urls", []):
        return path
    values["urls"] = [*values.get("urls", []), url]
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(values, out, sort_keys=False)
    os.chmod(temp, 0o600)  # whatever the umask made of it
    os.replace(temp, path)
    return path


# --------------------------------------------------------------------------------------------
# Masking: a target as it may be printed
# --------------------------------------------------------------------------------------------


def mask(url: str) -> str:
    """A target as cnnflow prints it: apprise's privacy form (tokens and passwords cut to
    `T...D` / `****`), with the path after the host and the query left out, since a generic
    webhook's path is often its secret: `json://127.0.0.1:8080/...`, `slack://T...D/...`."""
    plugin = _plugin(url, None)
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    if plugin is None:
        return f"{scheme}://***"
    private = urllib.parse.urlsplit(plugin.url(privacy=True))
    path = private.path.strip("/")
    return f"{private.scheme}://{private.netloc}" + ("/..." if path else "")


def scrub(text: str, urls: Iterable[str]) -> str:
    """`text` (an error from apprise or a library below it) with every secret part of `urls`
    (the password, path segments, query values, and the parts of the host that apprise
    itself hides: a token in place of a host) as ***,
    each where it stands as a whole word."""
    secrets: set[str] = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        shown = mask(url)
        secrets.update(s for s in [parts.password, *parts.path.split("/")] if s)
        secrets.update(v for _, v in urllib.parse.parse_qsl(parts.query) if v)
        secrets.update(s for s in re.split(r"[:@]", parts.netloc) if s and s not in shown)
        secrets.add(url)
    for secret in sorted(secrets, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w-])", "***", text)
    return mask_text(one_line(text))


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


def _plugin(url: str, config: Config | None):
    """apprise's service object for `url` (None when apprise cannot use it), with retries and
    socket timeouts that fit `config.timeout`."""
    import apprise

    asset = apprise.AppriseAsset()
    if config is not None:
        asset = apprise.AppriseAsset(default_service_retry=config.retries,
                                     default_service_wait=config.wait())
    try:
        plugin = apprise.Apprise.instantiate(url, asset=asset)
    except Exception:  # noqa: BLE001 - apprise refuses a URL by returning None, mostly
        return None
    if plugin is not None and config is not None:
        plugin.socket_connect_timeout = plugin.socket_read_timeout = config.attempt_seconds()
        plugin.retry = min(plugin.retry, config.retries)  # a URL's ?retry= must fit too
    return plugin


def _deliver_one(url: str, message: Message, config: Config, out: dict[int, Delivery],
                 key: int) -> None:
    """Send one message to one target (a worker thread's body; records, never raises)."""
    import apprise

    started = time.monotonic()
    try:
        plugin = _plugin(url, config)
        if plugin is None:
            raise NotifyError("apprise cannot use this URL")
        sender = apprise.Apprise(asset=plugin.asset)
        sender.add(plugin)
        result = sender.notify(body=message.body, title=message.title,
                               notify_type=message.level, body_format="text",
                               timeout=config.timeout)
        ok, reason = bool(result), "" if result else _reason(result, config)
    except Exception as exc:  # noqa: BLE001 - a failing target is reported, never raised
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    out[key] = Delivery(mask(url), ok, time.monotonic() - started, scrub(reason, [url]))


def _reason(result: Any, config: Config) -> str:
    """The last warning apprise logged for a failed send, or what its status says."""
    lines = [entry.message for service in result for entry in service.logs()
             if entry.level in ("WARNING", "ERROR")]
    if lines:
        return lines[-1]
    status = getattr(result.status, "name", str(result.status))
    return f"no answer within {config.timeout:g} s" if status == "TIMEOUT" \
        else f"apprise status {status}"


def deliver(messages: Iterable[Message], config: Config) -> list[Delivery]:
    """Send each message to each target at once, each on a daemon thread, and wait for them
    at most `config.timeout` seconds in all; a target that did not answer in time counts as
    failed (its thread ends on its own, its sockets timing out within the same budget)."""
    deadline = time.monotonic() + config.timeout
    jobs = [(message, url) for message in messages for url in config.urls]
    out: dict[int, Delivery] = {}
    threads = []
    for key, (message, url) in enumerate(jobs):
        thread = threading.Thread(target=_deliver_one, args=(url, message, config, out, key),
                                  name="cnnflow-notify", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [out.get(key) or Delivery(mask(url), False, config.timeout,
                                     f"no answer within {config.timeout:g} s")
            for key, (_, url) in enumerate(jobs)]


def send(*messages: Message) -> list[Delivery]:
    """Send alerts if configured: never raises, waits at most the configured timeout, and
    logs one masked warning per target that did not take a message."""
    messages = tuple(m for m in messages if m is not None)
    if not messages or not enabled():
        return []
    try:
        config = load_config()
    except NotifyError as exc:
        logger.warning("alerts are off: %s", exc)
        return []
    except Exception as exc:  # noqa: BLE001
        logger.warning("alerts are off: %s", mask_text(one_line(f"{type(exc).__name__}: {exc}")))
        return []
    if config is None:
        return []
    deliveries = deliver(messages, config)
    for delivery in deliveries:
        if not delivery.ok:
            logger.warning("alert not sent to %s: %s", delivery.target, delivery.reason)
    return deliveries


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No event alerts inside the block (this thread): for work another alert already covers,
    e.g. the best trial a study retrains, which the study's own alert reports."""
    token = _MUTED.set(True)
    try:
        yield
    finally:
        _MUTED.reset(token)


def _quiet(func: _F) -> _F:
    """An event hook: does nothing when alerts are off or muted, never raises into its
    caller."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not enabled():
            return None
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an alert never fails the work it reports
            logger.warning("alert not sent: %s", mask_text(one_line(f"{type(exc).__name__}: "
                                                                     f"{exc}")))
            return None
    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The events
# --------------------------------------------------------------------------------------------


def _lines(rows: Iterable[tuple[str, Any]]) -> str:
    """`key: value` lines, empty values left out: easy to read on a phone, easy to parse."""
    return "\n".join(f"{k}: {v}" for k, v in rows if v not in (None, ""))


def key_metrics(metrics: Mapping[str, float], names: Iterable[str] = KEY_METRICS
                ) -> list[tuple[str, str]]:
    """(human label, formatted value) of the key metrics the run has, e.g.
    ('best val accuracy', '93.9 %')."""
    return [(humanize.label(n), humanize.number(metrics[n], n)) for n in names if n in metrics]


def run_ended_message(kind: str, name: str, status: str, metrics: Mapping[str, float],
                      url: str, error: str | None = None, detail: str = "") -> Message | None:
    """A top-level run ended: `kind` is its step (train, pipeline); None for a status that
    sends nothing (KILLED)."""
    level = RUN_LEVELS.get(status)
    if level is None:
        return None
    event = "finished" if status == "FINISHED" else "failed"
    body = _lines([("run", name), ("step", kind), ("status", status),
                   *key_metrics(metrics), ("error", mask_text(one_line(error or ""))),
                   ("champion", detail), ("MLflow", url)])
    return Message(event, f"cnnflow: {name} {event}", body, level)


@_quiet
def run_ended(kind: str, name: str, status: str, metrics: Mapping[str, float], url: str,
              error: str | None = None, detail: str = "") -> None:
    """Alert: a standalone training run or a pipeline FINISHED or FAILED (with the error)."""
    send(run_ended_message(kind, name, status, metrics, url, error, detail))


def died_message(doc: Mapping[str, Any]) -> Message:
    """A run still RUNNING in MLflow but silent (the mirror's `died`): `doc` is its mirror
    status document plus `mlflow_url`."""
    epoch = doc.get("current_epoch")
    progress = f"{epoch}/{doc['max_epochs']}" if epoch and doc.get("max_epochs") else epoch
    name = doc.get("run_name") or doc["run_id"]
    body = _lines([("run", name), ("status", "died (RUNNING in MLflow, no sign of life)"),
                   ("last heartbeat", humanize.number(doc.get("last_heartbeat"))),
                   ("epoch", progress),
                   ("resume", f"cnnflow train --resume {doc['run_id']}"
                    if doc.get("step", "train") == "train" else None),
                   ("MLflow", doc.get("mlflow_url"))])
    return Message("died", f"cnnflow: {name} died", body, "failure")


@_quiet
def announce_died(status_collection: Any, docs: list[Mapping[str, Any]]) -> None:
    """Alert once per run that died: each run is claimed on its mirror status document
    (`DIED_FLAG`, set atomically), so followers restarted or running side by side send one
    alert between them. At most once: a send that fails is not retried on later passes."""
    claimed = [doc for doc in docs if status_collection.update_one(
        {"_id": doc["run_id"], DIED_FLAG: {"$ne": True}},
        {"$set": {DIED_FLAG: True}}).modified_count]
    send(*[died_message(doc) for doc in claimed])


def champion_message(name: str, version: str, before: str | None, metric: str,
                     value: float | None, before_value: float | None, reason: str,
                     url: str) -> Message:
    """`@champion` moved to `version` (from `before`), with both versions' `metric`."""
    compared = (f"{humanize.number(before_value, metric) or 'n/a'} (v{before}) -> "
                f"{humanize.number(value, metric) or 'n/a'} (v{version})" if before
                else f"{humanize.number(value, metric) or 'n/a'} (v{version}, first champion)")
    body = _lines([("model", f"{name}@champion"), ("version", f"v{before} -> v{version}"
                                                   if before else f"v{version}"),
                   (humanize.label(metric), compared), ("reason", reason), ("MLflow", url)])
    return Message("champion", f"cnnflow: {name} v{version} is the new champion", body,
                   "success")


@_quiet
def new_champion(name: str, version: str, before: str | None, metric: str,
                 value: float | None, before_value: float | None, reason: str,
                 url: str) -> None:
    """Alert: the registered model's `@champion` alias moved."""
    send(champion_message(name, version, before, metric, value, before_value, reason, url))


def tune_message(name: str, metric: str, best_value: float, best_params: Mapping[str, Any],
                 counts: Mapping[str, int], url: str,
                 retrained: Mapping[str, float] | None = None) -> Message:
    """A study ended: its best value and parameters, how its trials went, and the key
    metrics of the best configuration retrained (`--retrain-best`)."""
    params = ", ".join(f"{k}={v}" for k, v in best_params.items())
    trials = ", ".join(f"{n} {state}" for state, n in counts.items())
    body = _lines([("run", name), ("step", "tune"), (f"best {metric}",
                                                     humanize.number(best_value, metric)),
                   ("best params", params), ("trials", trials),
                   *[(f"retrained {k}", v) for k, v in key_metrics(retrained or {})],
                   ("MLflow", url)])
    return Message("tune", f"cnnflow: {name} finished", body, "success")


@_quiet
def tune_finished(name: str, metric: str, best_value: float, best_params: Mapping[str, Any],
                  counts: Mapping[str, int], url: str,
                  retrained: Mapping[str, float] | None = None) -> None:
    """Alert: a tuning study finished."""
    send(tune_message(name, metric, best_value, best_params, counts, url, retrained))


def probe_message() -> Message:
    """What `cnnflow notify --test` sends."""
    import socket

    return Message("test", "cnnflow: test alert",
                   _lines([("from", socket.gethostname()),
                           ("note", "alerts from cnnflow reach this target")]), "info")
