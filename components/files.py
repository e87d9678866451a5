"""Output files every step writes the same way: CSV tables, and folders swapped into place.

A torch-free, MLflow-free leaf: any layer may import it.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
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
