"""The command line reads one way everywhere: every boolean option of every command (the
generated ones and the hand-written ones) is `--name true|false`, as MLproject's `--name
{value}` command lines pass it, with its default spelled the same; no help shows an empty
default. Walks `pipelines.cli.COMMANDS` (and any nested group), so a new command is checked
without touching this file."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from pipelines import mlproject
from pipelines.cli import COMMANDS, cli
from pipelines.options import BOOL_METAVAR


def _walk(command: click.Command, path: tuple[str, ...]):
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), (*path, name))


def every_command() -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name in COMMANDS:
        found += _walk(mlproject.command(name), (name,))
    # `python -m pipelines.mlproject [--docs true]` is a command line too.
    return [*found, (("pipelines.mlproject",), mlproject.main)]


COMMAND_PATHS = every_command()
IDS = [" ".join(path) for path, _ in COMMAND_PATHS]


def boolean_options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden
            and (p.is_flag or isinstance(p.type, click.types.BoolParamType))
            and "--help" not in p.opts]


def test_the_walk_reaches_every_command_and_their_booleans():
    assert {path[0] for path, _ in COMMAND_PATHS} >= set(COMMANDS)
    names = {opt.name for _, cmd in COMMAND_PATHS for opt in boolean_options(cmd)}
    # Generated (run's cache/force) and hand-written ones (compare, up, mlproject) alike.
    assert {"cache", "force", "reverse", "with_sync", "docs"} <= names


@pytest.mark.parametrize(("path", "command"), COMMAND_PATHS, ids=IDS)
def test_every_boolean_option_takes_true_or_false(path, command):
    for option in boolean_options(command):
        name = max(option.opts, key=len)
        where = f"{' '.join(path)} {name}"
        assert not option.is_flag, f"{where} is a bare flag: declare it with bool_option"
        assert option.metavar == BOOL_METAVAR, where
        assert option.default in ("true", "false") and option.show_default, where
        for text, value in (("true", True), ("false", False)):
            ctx = command.make_context(path[-1], [name, text], resilient_parsing=False)
            assert ctx.params[option.name] is value, where
        ctx = command.make_context(path[-1], [name])  # a bare `--name` means true
        assert ctx.params[option.name] is True, where
        ctx = command.make_context(path[-1], [])
        assert ctx.params[option.name] is (option.default == "true"), where


@pytest.mark.parametrize(("path", "command"), COMMAND_PATHS, ids=IDS)
def test_help_spells_defaults_one_way(path, command):
    ctx = click.Context(command, info_name=" ".join(path), terminal_width=200)
    text = command.get_help(ctx)
    assert '[default: ""]' not in text and "[default: ]" not in text, text
    assert not re.search(r"\[default: (True|False)\]", text), text
    for option in boolean_options(command):
        opts, help_text = option.get_help_record(ctx)
        assert opts.endswith(f" {BOOL_METAVAR}") and f"{opts}  " in text, opts
        assert help_text.endswith(f"[default: {option.default}]"), help_text


def test_a_value_that_is_not_a_boolean_is_one_clear_error():
    result = CliRunner().invoke(cli, ["compare", "--reverse", "maybe"])
    assert result.exit_code == 2
    assert "'maybe' is not a valid boolean" in result.output


def test_progress_without_a_terminal_is_plain_periodic_lines():
    from components.progress import Progress, track

    lines: list[str] = []
    batches = [[0] * 4, [0] * 4, [0] * 2]
    seen = list(track(batches, 10, "evaluate m-v1", "image", bar=False, every=0,
                      log=lines.append, weight=len))
    assert seen == batches
    assert [li.split(",")[0] for li in lines] == [
        "evaluate m-v1: 4/10 images (40 %)", "evaluate m-v1: 8/10 images (80 %)",
        "evaluate m-v1: 10/10 images (100 %)"]
    assert all(re.search(r", [\d.]+ s$", li) for li in lines)
    quiet: list[str] = []  # a step shorter than the interval prints nothing
    with Progress(1, "sync --rebuild", "metric history", many="metric histories", bar=False,
                  log=quiet.append) as shown:
        shown.update()
        assert shown.line().startswith("sync --rebuild: 1/1 metric history (100 %)")
    assert quiet == []
