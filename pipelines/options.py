"""Click options generated from a parameter dataclass, so each default lives in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


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
