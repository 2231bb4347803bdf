"""The registry of model families: every module in this package defines one `FAMILY` (families/base.py says what
that holds). Adding a family is adding a file here (and its entry in tests/test_contract.py); nothing else names it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import IclcaError
from .base import CACHE_KINDS, LINEAR_KINDS, SOFTMAX_KINDS, Family

__all__ = ["CACHE_KINDS", "Family", "LINEAR_KINDS", "SOFTMAX_KINDS", "all_families", "family_of", "family_named"]


@functools.cache
def all_families() -> dict[str, Family]:
    """model_type -> Family, for every family file in this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
            found[family.model_type] = family
    return dict(sorted(found.items()))


def family_named(model_type: str) -> Family:
    families = all_families()
    if model_type not in families:
        raise IclcaError(f"model type {model_type!r} is not supported",
                         f"iclca patches {', '.join(families)} models (a merged iclca folder is patched through its base model)")
    return families[model_type]


def family_of(model) -> Family:
    """The family of a loaded model (or config), or an IclcaError for an architecture iclca cannot patch."""
    config = getattr(model, "config", model)
    return family_named(config.model_type)
