"""`taylor`: a softmax-attention layer's prompt part with exp replaced by a Taylor feature map, phi(q).phi(k) ~
exp(s q.k): memories S = sum phi(k) v^T, z = sum phi(k) of constant size (approximate)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import IclcaError
from ..families import SOFTMAX_KINDS
from .base import Method, Param

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Taylor(Method):
    name = "taylor"
    help = "softmax attention: Taylor memories of the prompt (constant size, approximate)"
    kinds = SOFTMAX_KINDS
    preference = 4
    params = (Param("order", "--order", "taylor_order", int, "Taylor order, 1 or 2", choices=(1, 2)),)

    order: int = 2

    def part(self, buffer: str) -> str:
        return "attention"  # memories stand for the prompt's keys and values

    def full_layer_tensors(self, captured) -> dict[str, torch.Tensor]:
        import torch

        from ..ops.compress import CHUNK_TOKENS
        from ..ops.taylor import taylor_feature_dim, taylor_features

        k, v = captured.keys, captured.values  # (Hkv, P, D)
        if captured.softcap is not None:
            raise IclcaError("Taylor memories cannot express soft-capped attention scores",
                             "use --method prefix or --method compressed for this model")
        if k.dtype in (torch.bfloat16, torch.float16):  # sums in float32, stored as the model computes
            work = dataclasses.replace(captured, keys=k.float(), values=v.float())
            return {name: t.to(k.dtype) for name, t in self.full_layer_tensors(work).items()}
        F = taylor_feature_dim(k.shape[-1], self.order)
        S, z = k.new_zeros(k.shape[0], F, v.shape[-1]), k.new_zeros(k.shape[0], F)  # (Hkv, F, D), (Hkv, F)
        for kc, vc in zip(k.split(CHUNK_TOKENS, dim=1), v.split(CHUNK_TOKENS, dim=1)):
            phi = taylor_features(kc, captured.scaling, self.order)  # (Hkv, C, F): never (Hkv, P, F)
            S += phi.transpose(-1, -2) @ vc
            z += phi.sum(-2)
        return {"memory_kv": S, "memory_k": z}

    def full_layer_shapes(self, patch, path: str, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        from ..ops.taylor import taylor_feature_dim

        F = taylor_feature_dim(head_dim, self.order)
        return {f"{path}.memory_kv": (kv_heads, F, head_dim), f"{path}.memory_k": (kv_heads, F)}


METHOD = Taylor
