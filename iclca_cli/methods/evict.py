"""`evict`: a full-attention layer keeps, per key/value head, the R prompt entries that receive the most attention from
reference queries, as they are (nothing fitted): the baseline `compressed` is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..families import SOFTMAX_KINDS
from .base import Method, Param

if TYPE_CHECKING:
    import torch

BUDGET = Param("budget", "--budget", "budget", int, "entries per layer and key/value head (compressed: on average, "
               "see --split), e.g. a third of the prompt's tokens", minimum=2)


@dataclass(frozen=True)
class Evict(Method):
    name = "evict"
    help = "softmax attention: the most attended prompt entries, as they are (constant size, a baseline)"
    kinds = SOFTMAX_KINDS
    on_cache = "attention"
    summarises = True
    preference = 3
    params = (BUDGET,)

    budget: int = 0

    def capture_ids(self, prompt_ids: list[int], positions_left: int | None) -> list[int]:
        from ..summaries import repeat_ids

        return repeat_ids(prompt_ids, positions_left)

    def summary_tensors(self, captured: dict, prompt_tokens: int) -> dict[str, dict[str, torch.Tensor]]:
        from ..ops import compress
        from ..summaries import captured_heads

        heads = captured_heads(captured, prompt_tokens)
        Hkv = heads.kv_heads
        s = compress.evict(heads.keys, heads.values, heads.ref, min(self.budget, prompt_tokens), heads.scaling,
                           heads.softcap)
        return {name: {"prefix_keys": s.keys[i * Hkv:(i + 1) * Hkv].to(heads.dtype).contiguous(),  # (Hkv, R, D)
                       "prefix_values": s.values[i * Hkv:(i + 1) * Hkv].to(heads.dtype).contiguous()}
                for i, name in enumerate(heads.names)}

    def full_layer_shapes(self, patch, path: str, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        shape = (kv_heads, min(self.budget, patch.prompt_tokens), head_dim)
        return {f"{path}.prefix_keys": shape, f"{path}.prefix_values": shape}


METHOD = Evict
