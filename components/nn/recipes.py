"""Named training recipes: presets of `train` parameters, tried with one word (`--recipe`).

The recipes that help most on small folders (strong augmentation, MixUp, an EMA of the
weights, label smoothing, a cosine schedule) are standard in timm's and fastai's trainers;
a preset bundles good values so a user does not have to know each knob. A preset is a plain
`field -> value` mapping over the training parameters (`TrainRecipe` in
components/steps/params.py, which applies it when the parameters are built): it fills the
fields still at their declared default, so a value the user passes wins, except one equal to
the default, which cannot be told from an unset field (to drop one item of a preset, pass
`--recipe none` and set the others yourself).

Torch-free on purpose: `--help` and MLproject generation read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from components.params import ParamError
from components.registrar import registrar

RECIPES: dict[str, Callable[[], dict[str, Any]]] = {}

# `@register_recipe(name)` adds a preset `fn() -> {train parameter: value}`.
register_recipe = registrar(RECIPES, "recipe")


@register_recipe("none")
def _no_recipe() -> dict[str, Any]:
    """Every parameter as given."""
    return {}


@register_recipe("small-data")
def _small_data() -> dict[str, Any]:
    """A few hundred to a few thousand images: regularise the training, not the images. EMA
    0.99 averages over the last ~100 optimiser steps (1 / (1 - decay)), a few epochs of such a
    folder. The augmentation stays the user's: flipping is wrong for digits or text."""
    return {"mixup": 0.2, "ema": 0.99, "label_smoothing": 0.1, "scheduler": "cosine"}


@register_recipe("small-photos")
def _small_photos() -> dict[str, Any]:
    """`small-data` plus strong augmentation (flips, rotation, colour, affine, noise), for
    photos whose class survives being mirrored or turned: leaves, jellyfish, cups, cells."""
    return {**_small_data(), "augmentation": "strong"}


def check_recipe(name: str) -> None:
    """One line listing the known recipes when `name` is not one."""
    if name not in RECIPES:
        raise ParamError(f"unknown recipe '{name}': choose one of {', '.join(RECIPES)}")


def recipe_values(name: str) -> dict[str, Any]:
    """The fields recipe `name` sets and their values."""
    check_recipe(name)
    return dict(RECIPES[name]())


def describe_recipes() -> str:
    """`none | small-data (augmentation=strong, mixup=0.2, ...)`: the help text's list."""
    items = []
    for name in RECIPES:
        values = RECIPES[name]()
        settings = ", ".join(f"{k}={v}" for k, v in values.items())
        items.append(f"{name} ({settings})" if settings else name)
    return " | ".join(items)
