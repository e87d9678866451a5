"""One way to load the steps' Jinja2 templates (`components/steps/templates/*.j2`).

HTML templates (`*.html.j2`) are autoescaped, so run names, paths and reasons taken from MLflow
cannot inject markup; Markdown templates are not (they escape what Markdown needs themselves).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).with_name("templates")


@cache
def environment() -> jinja2.Environment:
    """The shared environment: templates/ next to this module, HTML autoescaped."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                            default_for_string=True, default=False),
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)


def render(template: str, **values: Any) -> str:
    """`template` (a file name under templates/) rendered with `values`."""
    return environment().get_template(template).render(**values)
