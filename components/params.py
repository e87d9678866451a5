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
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from components.errors import CnnflowError

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
MAX_WORKERS = 256  # loader processes: more is a typo, not a machine


class ParamError(CnnflowError, ValueError):
    """A parameter value the user must change, reported before any work starts."""


class Bounds(NamedTuple):
    """A numeric parameter's allowed range: `ge`/`gt` below, `le`/`lt` above (None: open)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        """NaN and infinities never hold: no parameter means them."""
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self) -> str:
        """The range as the messages and the help say it: `in [8, 1024]`, `> 0`, `in [0, 1)`."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = ("]", self.le) if self.le is not None else (")", self.lt)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low[1] is not None:
            return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"

    def broken(self, value: float) -> str:
        """How `value` misses the range: `is below 8`, `is not above 0`, ..."""
        checks = [(self.ge, lambda b: value >= b, "is below"),
                  (self.gt, lambda b: value > b, "is not above"),
                  (self.le, lambda b: value <= b, "is above"),
                  (self.lt, lambda b: value < b, "is not below")]
        if not math.isfinite(value):
            return "is not a finite number"
        return next((f"{words} {_num(bound)}" for bound, ok, words in checks
                     if bound is not None and not ok(bound)), "")


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def param(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """One parameter: a dataclass field with its default and the help text every front end shows.

    The default must be a str, int, float or bool: the command line and MLproject pass values
    as text, and the field's type is the default's. A number may declare its range (`ge`,
    `gt`, `le`, `lt`): `check_bounds` enforces it before any run exists, and the help text
    (so `--help` and docs/parameters.md) states it.
    """
    if type(default) not in (str, int, float, bool):
        raise TypeError(f"a parameter default must be str, int, float or bool, not {default!r}")
    metadata: dict[str, Any] = {"help": help}
    if (ge, gt, le, lt) != (None, None, None, None):
        if type(default) not in (int, float):
            raise TypeError(f"only a number has a range, not {default!r}")
        bounds = Bounds(ge, gt, le, lt)
        if not bounds.holds(default):
            raise ValueError(f"default {default!r} is not {bounds.text()}")
        metadata["bounds"] = bounds
    return dataclasses.field(default=default, metadata=metadata)


def bounds_of(field: dataclasses.Field) -> Bounds | None:
    """The range `param` declared for a field, if any."""
    return field.metadata.get("bounds")


def check_bounds(params: Any) -> None:
    """Every declared range of a parameter dataclass, checked in the order the front ends list
    the fields: one line naming the first parameter out of range, its value and the range."""
    for field in fields_of(type(params)):
        bounds, value = bounds_of(field), getattr(params, field.name)
        if bounds is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(f"{field.name}={value!r} is not a number: {field.name} must be "
                             f"{bounds.text()}")
        if not bounds.holds(value):
            raise ParamError(f"{field.name}={_num(value)} {bounds.broken(value)}: {field.name} "
                             f"must be {bounds.text()}")


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
    """The help text `param` stored on a field, with its range when it declares one."""
    bounds = bounds_of(field)
    if bounds is None:
        return field.metadata["help"]
    return f"{field.metadata['help']} Range: {bounds.text().removeprefix('in ')}."


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
                                  "split folder has no val/).", ge=0, lt=1)
    test_ratio: float = param(0.2, "Test share of a flat folder (carved from train/ when a split "
                                   "folder has no test/).", ge=0, lt=1)
    seed: int = param(42, "Random seed of all that is random: the split, initial weights, "
                          "batch order (and tune's sampler).", ge=0, le=MAX_SEED)


@dataclass
class RuntimeParams:
    """Where and with how many loader processes a step runs: not what it computes."""

    device: str = param("auto", "auto | cpu | cuda | cuda:N | mps.")
    num_workers: int = param(2, "DataLoader worker processes.", ge=0, le=MAX_WORKERS)
