"""Click options generated from a parameter dataclass, so each default lives in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator


def dataclass_options(params_cls: type) -> Callable:
    """Decorator adding `--field-name` for every parameter of `params_cls` (a dataclass of
    `components.params.param` fields): its default, its type (the default's) and its help.

    Booleans take a value (`--cache true`, `bool_option`), so the MLproject command line
    `--cache {cache}` and the CLI read the same way; a bare `--cache` means true. The command
    keeps the class (`params_class(command)`), so MLproject and the parameter reference are
    generated from it.
    """
    from components.params import fields_of

    def decorate(func: Callable) -> Callable:
        for field in reversed(fields_of(params_cls)):
            func = click_option(field)(func)
        func.params_class = params_cls  # type: ignore[attr-defined]
        return func
    return decorate


def click_option(field: dataclasses.Field) -> Callable:
    """The click option of one parameter field: a boolean through `bool_option`, an empty
    default not shown (the help says what empty means), any other default shown."""
    import click

    from components.params import help_of

    if isinstance(field.default, bool):
        return bool_option(option_name(field.name), field.default, help_of(field),
                           dest=field.name)
    return click.option(option_name(field.name), field.name, default=field.default,
                        type=type(field.default), show_default=field.default != "",
                        help=help_of(field))


BOOL_METAVAR = "true|false"


def bool_option(name: str, default: bool, help: str, *, dest: str | None = None) -> Callable:
    """Every boolean option of every command, one style: `--name true|false`, as MLproject's
    `--name {value}` command lines pass it; a bare `--name` means true; the default shows as
    `[default: false]` (MLproject's spelling). Generated and hand-written options use it."""
    import click

    from components.params import bool_text

    decls = (name, dest) if dest else (name,)
    return click.option(*decls, type=click.BOOL, metavar=BOOL_METAVAR, is_flag=False,
                        flag_value=True, default=bool_text(default), show_default=True,
                        help=help)


def option_name(name: str) -> str:
    """`val_ratio` -> `--val-ratio`: the command-line spelling of a parameter."""
    return "--" + name.replace("_", "-")


def params_class(command: object) -> type | None:
    """The parameter dataclass a command's options were generated from, if any."""
    return getattr(getattr(command, "callback", None), "params_class", None)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """What the user can fix becomes one masked line and exit 1; Ctrl-C exits 130.

    The step itself has already ended its MLflow run FAILED or KILLED with the reason.
    """
    import click

    from components.errors import CnnflowError, one_line
    from components.settings import mask_text

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield
    except (CnnflowError, FileNotFoundError) as exc:
        if getattr(exc, "said_elsewhere", False):  # a peer process printed the same line
            sys.exit(1)
        raise click.ClickException(mask_text(one_line(exc))) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the run was marked KILLED", err=True)
        sys.exit(130)
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow."):
            raise
        # The server went away or refused a request half-way: the step ended its run FAILED.
        first = one_line(exc) or type(exc).__name__
        raise click.ClickException(mask_text(f"MLflow: {first}"[:500])) from None


def reachable_tracking_uri() -> str:
    """The tracking server this command will use, checked first so a typo costs seconds.

    A local store while `cnnflow up`'s server runs (`mlflow run` with nothing exported) gets
    one note on stderr: those runs would not show in the UI the user is looking at.
    """
    import click

    from components.services import check_tracking_server, local_store_note, tracking_uri

    uri = tracking_uri()
    check_tracking_server(uri)
    note = local_store_note(uri)
    if note:
        click.echo(note, err=True)
    return uri


def job_run_id(experiment: str = "", tracking_uri: str = "") -> str | None:
    """The run `mlflow run` opened for this job (MLFLOW_RUN_ID), or None under `cnnflow`.

    Read here, at the command-line boundary, and nowhere else: the command hands it to its
    step as an argument, and the step fills that run in instead of opening one of its own.
    A non-empty `experiment` (`-P experiment=...`) must be the experiment that run is in:
    otherwise the run ends FAILED with the reason, before any work, and the command exits 1.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID") or None
    if run_id and experiment:
        _check_job_experiment(run_id, experiment, tracking_uri)
    return run_id


def _check_job_experiment(run_id: str, experiment: str, tracking_uri: str) -> None:
    """`mlflow run` picks the experiment (--experiment-name) before cnnflow starts: say so."""
    import shlex

    import click

    from components import tracking
    from components.services import tracking_uri as configured_uri

    client = tracking.connect(tracking_uri or configured_uri())
    actual = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    if actual == experiment:
        return
    reason = (f"-P experiment={experiment} but mlflow run opened its run in experiment "
              f"'{actual}': pass --experiment-name {shlex.quote(experiment)} to mlflow run "
              "(and drop -P experiment)")
    tracking.finish_run(client, run_id, "FAILED", reason)
    raise click.ClickException(reason)


def next_step(command: str, why: str = "") -> None:
    """The `next: <command>` line a command ends with (stderr): what a user would run next,
    spelled with the real options, so a first-time user never has to guess the next step."""
    import click

    click.echo(f"next: {command}" + (f"  ({why})" if why else ""), err=True)


def shell_args(values: dict[str, object]) -> str:
    """`--name value` for each item, quoted for a shell, booleans as `true` / `false`."""
    import shlex

    from components.params import bool_text

    return " ".join(f"{option_name(k)} {shlex.quote(str(bool_text(v)))}"
                    for k, v in values.items())
