"""Click options generated from a parameter dataclass, so each default lives in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator


def dataclass_options(params_cls: type, help_texts: dict[str, str]) -> Callable:
    """Decorator adding `--field-name` for every field of `params_cls`, typed by its default.

    Booleans take a value (`--cache true`), not a bare flag, so the MLproject command line
    `--cache {cache}` and the CLI read the same way.
    """
    def decorate(func: Callable) -> Callable:
        for field in reversed(dataclasses.fields(params_cls)):
            flag = "--" + field.name.replace("_", "-")
            func = click_option(flag, field.name, field.default, help_texts[field.name])(func)
        return func
    return decorate


def click_option(flag: str, name: str, default: object, help_text: str) -> Callable:
    import click

    kind = type(default)
    extra = {"is_flag": False, "metavar": "true|false"} if kind is bool else {}
    return click.option(flag, name, type=kind, default=default, show_default=True,
                        help=help_text, **extra)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """What the user can fix becomes one masked line and exit 1; Ctrl-C exits 130.

    The step itself has already ended its MLflow run FAILED or KILLED with the reason.
    """
    import click

    from components.errors import CnnflowError
    from components.settings import mask_text

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield
    except (CnnflowError, FileNotFoundError) as exc:
        raise click.ClickException(mask_text(str(exc).splitlines()[0])) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the run was marked KILLED", err=True)
        sys.exit(130)
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow."):
            raise
        # The server went away or refused a request half-way: the step ended its run FAILED.
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise click.ClickException(mask_text(f"MLflow: {first}"[:500])) from None


def reachable_tracking_uri() -> str:
    """The tracking server this command will use, checked first so a typo costs seconds."""
    from components.services import check_tracking_server, tracking_uri

    uri = tracking_uri()
    check_tracking_server(uri)
    return uri
