"""Named capture points: forward hooks that keep each attention module's final memories.

Hooks are scoped (`with capture_memories(model) as captured:`) and removed on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import IclcaError
from .models.modeling_iclca_linear import IclcaLinearAttention


def attention_modules(model: torch.nn.Module) -> dict[str, IclcaLinearAttention]:
    """Module path -> linear-attention module, e.g. 'transformer.h.0.attn'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IclcaLinearAttention)}


@contextmanager
def capture_memories(model: torch.nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield {module path: (S (B,H,F,Dv), z (B,H,F))}, updated to the latest forward's final memories."""
    modules = attention_modules(model)
    if not modules:
        raise IclcaError(
            f"{type(model).__name__} has no linear-attention layers to capture",
            "method 'exact' needs an iclca_linear model (e.g. --model demo-linear)",
        )
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            S, z = output[1]
            captured[name] = (S.detach(), z.detach())

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
