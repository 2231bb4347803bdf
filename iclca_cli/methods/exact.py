"""`exact`: a layer that keeps a finite state (linear attention, state-space, short convolution, and a hybrid's
attention cache) is patched with its state after the prompt: the patched model equals the prompted one."""

from __future__ import annotations

from dataclasses import dataclass

from ..families import LINEAR_KINDS
from .base import Method


@dataclass(frozen=True)
class Exact(Method):
    name = "exact"
    help = "linear-attention, state-space and hybrid layers: the prompt's final state (exact)"
    kinds = LINEAR_KINDS
    on_cache = "all"
    exact = True
    stackable = True
    preference = 0


METHOD = Exact
