"""How a parameter is declared, and the groups of parameters many steps share.

A parameter is one dataclass field: its type, its default and its help text, declared once
(`param(default, help)`). A step's parameter class inherits the groups it takes, so `data`,
`seed` or `device` mean and default the same everywhere; the click options, the MLproject
entry points and `docs/parameters.md` are all generated from these fields
(`pipelines/options.py`, `pipelines/mlproject.py`).

A field a step re-declares under a group's name has another meaning or default there, said in
that step's docstring; `inherited(cls, group)` names only the fields `cls` takes unchanged, so
such a field is never passed on by mistake.

Import-light on purpose (no torch, torchvision or mlflow): `cnnflow --help` reads it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from components.errors import CnnflowError


class ParamError(CnnflowError, ValueError):
    """A parameter value the user must change, reported before any work starts."""


def param(default: Any, help: str) -> Any:
    """One parameter: a dataclass field with its default and the help text every front end shows.

    The default must be a str, int, float or bool: the command line and MLproject pass values
    as text, and the field's type is the default's.
    """
    if type(default) not in (str, int, float, bool):
        raise TypeError(f"a parameter default must be str, int, float or bool, not {default!r}")
    return dataclasses.field(default=default, metadata={"help": help})


def bool_text(value: Any) -> Any:
    """A boolean as `mlflow run` logs it and the command line reads it ("true" / "false");
    any other value unchanged."""
    return str(value).lower() if isinstance(value, bool) else value


def split_list(text: str, *, whitespace: bool = True) -> list[str]:
    """A list parameter's items ("a,b", "a, b", "a b"): split on commas and, unless
    `whitespace` is false (names that may hold spaces), on white space; empty items dropped."""
    items = re.split(r"[,\s]+" if whitespace else ",", str(text))
    return [item.strip() for item in items if item.strip()]


def help_of(field: dataclasses.Field) -> str:
    """The help text `param` stored on a field."""
    return field.metadata["help"]


def fields_of(cls: type) -> list[dataclasses.Field]:
    """The parameters of `cls` in the order the front ends list them: its own first, then each
    group it inherits, in method-resolution order; a re-declared field shows where it is
    declared."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ordered: list[dataclasses.Field] = []
    for klass in cls.__mro__:
        declared = vars(klass).get("__dataclass_fields__", {})
        for name in vars(klass).get("__annotations__", {}):
            field = fields.get(name)
            if field is not None and declared.get(name) is field and field not in ordered:
                ordered.append(field)
    return ordered


def inherited(cls: type, group: type) -> list[str]:
    """The fields of `group` that `cls` takes unchanged (same declaration, same meaning)."""
    own = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return [f.name for f in dataclasses.fields(group) if own.get(f.name) is f]


@dataclass
class DataParams:
    """Which images, how a flat folder is split, and where the runs go."""

    data: str = param("digits", "`digits` (bundled) or a folder: root/<class>/* or "
                                "root/{train,val,test}/<class>/*.")
    experiment: str = param("", "MLflow experiment name (default: the dataset's name).")
    val_ratio: float = param(0.2, "Validation share of a flat folder (carved from train/ when a "
                                  "split folder has no val/).")
    test_ratio: float = param(0.2, "Test share of a flat folder (carved from train/ when a split "
                                   "folder has no test/).")
    seed: int = param(42, "Random seed of all that is random: the split, initial weights, "
                          "batch order (and tune's sampler).")


@dataclass
class RuntimeParams:
    """Where and with how many loader processes a step runs: not what it computes."""

    device: str = param("auto", "auto | cpu | cuda | cuda:N | mps.")
    num_workers: int = param(2, "DataLoader worker processes.")
