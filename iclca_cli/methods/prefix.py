"""`prefix`: a softmax-attention layer keeps the prompt's keys and values (after the rotary embedding) and attends to
them beside the query's own: exact, and as large as the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..families import SOFTMAX_KINDS
from .base import Method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Prefix(Method):
    name = "prefix"
    help = "softmax attention: the prompt's keys and values (exact, grows with the prompt)"
    kinds = SOFTMAX_KINDS
    exact = True
    preference = 1

    def full_layer_tensors(self, captured) -> dict[str, torch.Tensor]:
        return {"prefix_keys": captured.keys.contiguous(), "prefix_values": captured.values.contiguous()}  # (Hkv, P, D)

    def full_layer_shapes(self, patch, path: str, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        shape = (kv_heads, patch.prompt_tokens, head_dim)
        return {f"{path}.prefix_keys": shape, f"{path}.prefix_values": shape}


METHOD = Prefix
