"""Taylor features of the softmax kernel: phi(q).phi(k) = sum_{n<=order} (s q.k)^n / n!  (order 1 or 2).

They turn exp(s q.k) on a prompt's keys into constant-size memories S = sum phi(k) v^T, z = sum phi(k) (the
`taylor` method). Good only where |s q.k| is small; order 1 can even give negative weights.
"""

from __future__ import annotations

import functools

import torch


def taylor_feature_dim(head_dim: int, order: int) -> int:
    """F = 1 + D (+ D(D+1)/2 for order 2)."""
    return 1 + head_dim + (head_dim * (head_dim + 1) // 2 if order == 2 else 0)


def taylor_order_of(feature_dim: int, head_dim: int) -> int:
    for order in (1, 2):
        if taylor_feature_dim(head_dim, order) == feature_dim:
            return order
    raise ValueError(f"feature size {feature_dim} is no Taylor order for head size {head_dim}")


@functools.lru_cache(maxsize=16)
def _pairs(D: int, dtype: torch.dtype, device: torch.device):
    """Index pairs i <= j and weights of the order-2 features, made once per (D, dtype, device):
    (q.k)^2 / 2 = sum_i q_i^2 k_i^2 / 2 + sum_{i<j} q_i q_j k_i k_j; weights built in the features' dtype."""
    i, j = torch.triu_indices(D, D, device=device)
    w = torch.ones(i.shape, dtype=dtype, device=device).masked_fill(i == j, 0.5**0.5)
    return i, j, w


def taylor_features(x: torch.Tensor, scaling: float, order: int) -> torch.Tensor:
    """phi with phi(q).phi(k) = sum_{n<=order} (s q.k)^n / n!.  (..., D) -> (..., F)"""
    x = x * scaling**0.5
    parts = [torch.ones_like(x[..., :1]), x]  # 1, x
    if order == 2:
        i, j, w = _pairs(x.shape[-1], x.dtype, x.device)
        index = x.shape[:-1] + (-1,)  # torch.gather: ~3x faster than x[..., i] for a 16-token query
        parts.append(torch.gather(x, -1, i.expand(index)) * torch.gather(x, -1, j.expand(index)) * w)  # (..., D(D+1)/2)
    return torch.cat(parts, dim=-1)


def taylor_kernel(scores: torch.Tensor, order: int) -> torch.Tensor:
    """The polynomial the features stand for, applied to scores x = s q.k: 1 + x (+ x^2 / 2)."""
    return 1 + scores + (scores**2 / 2 if order == 2 else 0)
