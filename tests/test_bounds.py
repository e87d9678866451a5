"""Every numeric parameter's range is declared once (`param(..., ge=, le=)`) and checked
before any run exists: one line naming the parameter, its value and the range, exit 1, and
an experiment with no runs. The ranges show in `--help` and docs/parameters.md."""

from __future__ import annotations

import dataclasses
import math
import uuid

import pytest
from click.testing import CliRunner

from components.params import Bounds, ParamError, bounds_of, check_bounds, fields_of, param
from pipelines.cli import cli
from pipelines.mlproject import command, entry_points


@pytest.fixture
def experiment() -> str:
    return f"bounds-{uuid.uuid4().hex[:8]}"


def no_runs(client, experiment: str) -> bool:
    exp = client.get_experiment_by_name(experiment)
    return exp is None or client.search_runs([exp.experiment_id]) == []


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return lines[0]


CASES = [
    ("train", ["--image-size", "100000"], "image_size=100000 is above 1024", "[8, 1024]"),
    ("train", ["--image-size", "4"], "image_size=4 is below 8", "[8, 1024]"),
    ("train", ["--batch-size", "0"], "batch_size=0 is below 1", "[1, 4096]"),
    ("train", ["--lr", "-1"], "lr=-1 is not above 0", "lr must be > 0"),
    ("train", ["--lr", "nan"], "lr=nan is not a finite number", "lr must be > 0"),
    ("train", ["--val-ratio", "1.5"], "val_ratio=1.5 is not below 1", "[0, 1)"),
    ("train", ["--val-ratio", "0.5", "--test-ratio", "0.5"], "val_ratio + test_ratio", "below 1"),
    ("train", ["--dropout", "1"], "dropout=1 is not below 1", "[0, 1)"),
    ("train", ["--epochs", "0"], "epochs=0 is below 1", "epochs must be in [1, "),
    ("train", ["--num-workers", "-1"], "num_workers=-1 is below 0", "[0, 256]"),
    ("train", ["--patience", "-3"], "patience=-3 is below 0", "patience must be in [0, "),
    ("tune", ["--image-size", "100000"], "image_size=100000 is above 1024", "[8, 1024]"),
    ("tune", ["--batch-size", "0"], "batch_size=0 is below 1", "[1, 4096]"),
    ("ensemble", ["--batch-size", "100000"], "batch_size=100000 is above 4096", "[1, 4096]"),
    ("ensemble", ["--test-ratio", "-0.1"], "test_ratio=-0.1 is below 0", "[0, 1)"),
    ("evaluate", ["--run-id", "0" * 32, "--latency-runs", "0"], "latency_runs=0 is below 1",
     "latency_runs must be in [1, "),
    ("evaluate", ["--run-id", "0" * 32, "--batch-size", "-1"], "batch_size=-1 is below 0",
     "[0, 4096]"),
    ("preprocess", ["--train-ratio", "0", "--val-ratio", "0.5", "--test-ratio", "0.5"],
     "train_ratio=0 is not above 0", "(0, 1]"),
    ("eda", ["--num-workers", "-2"], "num_workers=-2 is below -1", "[-1, 256]"),
]


@pytest.mark.parametrize("step, args, what, allowed", CASES,
                         ids=[f"{c[0]}{''.join(c[1])}" for c in CASES])
def test_out_of_range_is_one_line_before_any_run(tracking, image_folder, experiment, step, args,
                                                 what, allowed):
    data = image_folder({"a": 4, "b": 4})
    result = CliRunner().invoke(cli, [step, "--data", str(data), "--experiment", experiment,
                                      *args], catch_exceptions=False) \
        if step != "evaluate" else CliRunner().invoke(cli, [step, *args],
                                                      catch_exceptions=False)
    line = error_line(result)
    assert what in line and allowed in line, line
    assert no_runs(tracking, experiment)


def test_every_numeric_parameter_of_every_entry_point_declares_its_range():
    """A new numeric parameter without a range fails here, whichever step it joins."""
    missing = sorted({f"{cls.__name__}.{f.name}" for _, cls in entry_points().values()
                      for f in fields_of(cls)
                      if type(f.default) in (int, float) and bounds_of(f) is None})
    assert missing == [], f"declare ge=/gt=/le=/lt= in param(...) for: {', '.join(missing)}"


@pytest.mark.parametrize("entry", list(entry_points()))
def test_every_entry_point_default_is_in_range_and_help_shows_it(entry):
    _, cls = entry_points()[entry]
    check_bounds(cls())  # the defaults themselves pass
    help_text = " ".join(CliRunner().invoke(cli, [command_name(entry), "--help"]).output.split())
    for field in fields_of(cls):
        bounds = bounds_of(field)
        if bounds is not None:
            assert f"Range: {bounds.text().removeprefix('in ')}." in help_text, field.name


def command_name(entry: str) -> str:
    from pipelines.mlproject import ENTRY_POINTS

    return command(ENTRY_POINTS[entry]).name or ENTRY_POINTS[entry]


def test_bounds_text_and_messages():
    @dataclasses.dataclass
    class Knobs:
        size: int = param(8, "Size.", ge=8, le=1024)
        rate: float = param(0.1, "Rate.", gt=0)
        share: float = param(0.0, "Share.", ge=0, lt=1)
        scale: float = param(1.0, "Scale.", gt=0, le=1)

    assert [bounds_of(f).text() for f in fields_of(Knobs)] == \
        ["in [8, 1024]", "> 0", "in [0, 1)", "in (0, 1]"]
    check_bounds(Knobs())
    for kwargs, message in [
        ({"size": 2000}, "size=2000 is above 1024: size must be in [8, 1024]"),
        ({"rate": 0.0}, "rate=0 is not above 0: rate must be > 0"),
        ({"share": 1.0}, "share=1 is not below 1: share must be in [0, 1)"),
        ({"share": math.inf}, "share=inf is not a finite number: share must be in [0, 1)"),
        ({"rate": True}, "rate=True is not a number: rate must be > 0"),
    ]:
        with pytest.raises(ParamError) as info:
            check_bounds(Knobs(**kwargs))
        assert str(info.value) == message
    assert Bounds(le=5).text() == "<= 5" and not Bounds(ge=0).holds(math.nan)
    with pytest.raises(ValueError, match="default 0 is not > 0"):
        param(0, "Bad default.", gt=0)
    with pytest.raises(TypeError, match="only a number"):
        param("x", "Text.", ge=0)
