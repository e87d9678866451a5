"""Output files every step writes the same way: CSV tables, folders swapped into place, and
temporary folders named after their process (swept when a killed run left them).

A torch-free, MLflow-free leaf: any layer may import it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order: a table's columns when none are given."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """`rows` as a CSV file with a header line; returns `path`.

    Columns: `columns` when given (other keys of a row are left out), else `columns_of(rows)`;
    a row lacking a column gets an empty cell.
    """
    rows = list(rows)
    if columns is None:
        columns = columns_of(rows)
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line (what `write_csv` wrote), as dicts of strings."""
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished output folder into place, so readers never see a half-written one.

    `new` comes from mkdtemp (mode 0700): it gets the mode a plain mkdir would have given.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(target: Path) -> Iterator[Path]:
    """A temp folder beside `target` to build an output in: swapped into place when the block
    ends cleanly (`replace_dir`); otherwise removed, with any parent folders this call made,
    so a failure leaves nothing behind."""
    target = Path(target)
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=target.parent))
    done = False
    try:
        yield work
        replace_dir(work, target)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for path in made:  # innermost first; one holding anything else stays
                try:
                    path.rmdir()
                except OSError:
                    break


TEMP_PREFIX = "cnnflow-"
STALE_AFTER_SEC = 24 * 3600.0


def temp_prefix(kind: str) -> str:
    """`cnnflow-<kind>-<pid>-`: a temp folder named after its process, so a later sweep can
    tell a live run's folder from one a killed run left behind."""
    return f"{TEMP_PREFIX}{kind}-{os.getpid()}-"


def remove_stale_temp(max_age: float = STALE_AFTER_SEC) -> list[Path]:
    """Remove this user's `cnnflow-*` temp folders that a killed process left: nothing in
    them touched for `max_age` seconds and the process in their name gone. Returns them."""
    removed = []
    now = time.time()
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            info = path.lstat()
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                    or _owner_alive(path.name) or now - _newest_mtime(path) < max_age):
                continue
            shutil.rmtree(path)
        except OSError:  # another sweep got there first, or it is not ours to remove
            continue
        removed.append(path)
    return removed


def _owner_alive(name: str) -> bool:
    """Whether the pid in `cnnflow-<kind>-<pid>-...` is a running process."""
    parts = name.split("-")
    if len(parts) < 4 or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    """The latest change anywhere in the folder: a long run's top folder can look old while
    its checkpoints are rewritten every epoch."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def slug(text: str) -> str:
    """A file or folder name safe on every OS."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "unnamed"
