"""The one way cnnflow keeps `name -> function` registries (augmentations, votes, samplers...).

Adding an entry is one decorated function; a name registered twice is a programming error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def registrar(table: dict[str, Any], kind: str) -> Callable[[str], Callable[[F], F]]:
    """`register = registrar(TABLE, "vote")`, then `@register("soft")` adds a function."""
    def register(name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn
        return decorate
    return register
