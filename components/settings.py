"""Where cnnflow keeps its state, and how it finds its servers.

Everything that depends on the environment is read here, once per call, so the rest of the
library takes explicit arguments and tests can point it anywhere with environment variables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MLFLOW_PORT = 5000
DEFAULT_MONGO_PORT = 27017
DEFAULT_POSTGRES_PORT = 5432  # where `cnnflow up --backend postgresql` starts its server
DEFAULT_HOST = "127.0.0.1"


def state_dir() -> Path:
    """The folder holding local services' data, pid files and logs (`.cnnflow/` by default)."""
    return Path(os.environ.get("CNNFLOW_HOME", ".cnnflow")).resolve()


def data_cache_dir() -> Path:
    """Where generated datasets (the bundled `digits`) are written on first use."""
    default = Path.home() / ".cache" / "cnnflow" / "datasets"
    return Path(os.environ.get("CNNFLOW_DATA_DIR", default)).resolve()


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@]*):(?P<pw>[^@/]*)@")


def mask_uri(uri: str | None) -> str:
    """Hide the password in `scheme://user:password@host` so a URI can be logged or tagged."""
    if not uri:
        return ""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(uri))


def mask_text(text: str) -> str:
    """Mask every URI password inside a free-form message (errors, log lines)."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+", lambda m: mask_uri(m.group(0)), text)


# SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg (3) driver; cnnflow ships psycopg2.
_SQLALCHEMY_DRIVERS = {"postgresql": "postgresql+psycopg2", "postgres": "postgresql+psycopg2"}


def url_backend(uri: str) -> str:
    """The database of a store URL, without its driver: `postgresql+psycopg2://...` ->
    `postgresql`, `sqlite:///x.db` -> `sqlite`; "" for a plain path."""
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""


def sqlalchemy_url(uri: str) -> str:
    """`uri` with the database driver cnnflow installs named, for SQLAlchemy (MLflow's store,
    Optuna's storage): postgresql://... becomes postgresql+psycopg2://...; others unchanged."""
    scheme, sep, rest = uri.partition("://")
    return f"{_SQLALCHEMY_DRIVERS.get(scheme.lower(), scheme)}{sep}{rest}" if sep else uri
