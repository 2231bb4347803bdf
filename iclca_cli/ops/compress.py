"""A prompt's keys and values summarised into R entries per key/value head (method `compressed`): keys, values and
a score bias per entry, whose attention approximates attention over the whole prompt. Not part of merged folders:
the summary is data; attending to it is ops/softmax_attention.py."""

from __future__ import annotations

import math

import torch

from .softmax_attention import soft_cap

CHUNK_TOKENS = 4096  # sample queries per step of the fit's target attention: memory bounded in P


def kmeans(x: torch.Tensor, C: int, iters: int = 20) -> torch.Tensor:
    """Cluster index of each row of x (N, D) among C clusters; deterministic (evenly spaced starts)."""
    centres = x[torch.linspace(0, x.shape[0] - 1, C).round().long()].clone()  # (C, D)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(-1)  # (N,)
        counts = torch.bincount(assign, minlength=C).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return torch.cdist(x, centres).argmin(-1)


def summarise(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, scaling: float, budget: int, softcap: float | None = None,
              ridge: float = 0.1):
    """Summarise one key/value head's prompt keys/values (P, D) into `budget` entries
    -> keys (R, D), values (R, D), score bias (R,). q (N, D): the prompt's own queries of the query
    heads that share this key/value head, used as samples of the queries to come.

    1. The first token (an attention sink in most trained models) stays exact.
    2. The others fall into budget-1 clusters by k-means on keys and values together (so that
       tokens with alike keys but different values stay apart); a cluster's key is its mean key
       and its score bias log(size), so it stands for its members in the softmax
       (exp(q.c + log n) = n exp(q.c)), and the softmax's normaliser stays about right.
    3. Values are fitted by ridge least squares (towards the cluster means) so that attention over
       the summary reproduces the prompt's attention outputs for the sample queries.
    Scores are soft-capped as the model caps them (softcap), before the bias.
    With budget >= P: the keys and values themselves, bias 0: exactly the prefix.
    """
    P = k.shape[0]
    if budget >= P:
        return k, v, torch.zeros(P, dtype=k.dtype, device=k.device)
    C = budget - 1
    unit = lambda x: x / x.norm(dim=-1).mean().clamp_min(1e-12)  # noqa: E731  (mean row norm 1)
    feats = torch.cat([unit(k[1:]), unit(v[1:])], dim=-1)  # (P-1, 2D): keys and values both count
    assign = kmeans(feats, C)  # (P-1,)
    counts = torch.bincount(assign, minlength=C).to(k.dtype)  # (C,)
    mean = lambda x: torch.zeros(C, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, assign, x[1:]) / counts.clamp_min(1)[:, None]  # noqa: E731
    keys, values = torch.cat([k[:1], mean(k)]), torch.cat([v[:1], mean(v)])  # (R, D)
    bias = torch.cat([counts.new_zeros(1), torch.where(counts > 0, counts.clamp_min(1).log(), -math.inf)])  # (R,) empty: never attended
    # (N, D): attention over the whole prompt, CHUNK_TOKENS queries at a time ((N, P) scores at once would not fit for long prompts)
    target = torch.cat([torch.softmax(soft_cap(c @ k.T * scaling, softcap), -1) @ v for c in q.split(CHUNK_TOKENS)])
    w = torch.softmax(soft_cap(q @ keys.T * scaling, softcap) + bias, -1)  # (N, R): attention over the summary
    gram = w.T @ w  # (R, R)
    lam = ridge * gram.diagonal().mean() * torch.eye(len(bias), dtype=w.dtype, device=w.device)
    values = torch.linalg.solve(gram + lam, w.T @ target + lam @ values)  # (R, D)
    return keys, values, bias
