"""What a patch does to a model's layers, by where the family's state lives (Family.state): one handler module per
state kind, all with the interface declared here.

    attention  softmax_layers  softmax attention layers: their keys and values, or what the method makes of them
    buffers    linear_layers   iclca_linear's bias buffers, filled from its linear-attention cache
    cache      cache_layers    a transformers cache every layer keeps its state in (state-space, hybrid, ...)
and, for a method whose patch is not a state but an update of the weights (Method.handler):
    weights    lora_layers     low-rank updates of any family's linear projections
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Protocol

import torch

from .families import Family


class Handler(Protocol):
    """The interface every handler module implements (functions of the module)."""

    def convert(self, model, family: Family, prompt_ids: list[int], method, chunk_size: int = 512,
                progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
        """The patch tensors '<module path>.<buffer>' of a prompt, run from the model's current state."""

    def expected_shapes(self, model, family: Family, patch) -> dict[str, tuple[int, ...]]:
        """Tensor name -> the shape a patch of this method must have for this model."""

    def merged_config(self, model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> dict:
        """Config entries a merged folder's class reads to rebuild the patched model."""

    def attach(self, model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> None:
        """Make the tensors part of the model (in place), queries starting at `offset`."""


def handler_for(family: Family, method=None) -> Handler | ModuleType:
    """The handler of the method's patches where it names one (Method.handler), else of the family's state kind: the
    one place that choice is made."""
    from . import cache_layers, linear_layers, lora_layers, softmax_layers

    kind = getattr(method, "handler", None) or family.state
    return {"attention": softmax_layers, "buffers": linear_layers, "cache": cache_layers, "weights": lora_layers}[kind]
