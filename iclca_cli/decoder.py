"""Softmax-attention decoders that call transformers' attention interface (GPT-2, and with rotary
positions Llama, Qwen2, Mistral): capture a prompt's keys and values, turn them into a `prefix`
(exact), `compressed` or `taylor` patch, and apply it, from the module structure and config alone.

- Capture: the model runs the prompt with its attention implementation switched to iclca's
  `patched_attention`, which records each attention module's (post-rotary) keys and values.
- Positions: a patched rotary model's rotary embedding module gets a forward pre-hook that adds P
  to the position ids, so a query sits at positions P, P+1, ... as it would after the prompt
  (GPT-2's position table is shifted instead: modeling_iclca_gpt2.attach_patch).
- Grouped-query attention: patch tensors are per key/value head, (Hkv, R, D).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import IclcaError
from .models.modeling_iclca_gpt2 import ATTENTION_NAME, register_patch_buffers, taylor_feature_dim, taylor_features
from .models.modeling_iclca_llama import shift_rotary

ROPE_FAMILIES = ("llama", "qwen2", "mistral")
CHUNK_TOKENS = 4096  # prompt tokens (or sample queries) per step of the Taylor and compressed fits: bounded memory
SOFTMAX_METHODS = ("prefix", "compressed", "taylor")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> self-attention module: the modules with a `layer_idx` and k/v projections
    (separate, or GPT-2's fused `c_attn`)."""
    found = {n: m for n, m in model.named_modules()
             if hasattr(m, "layer_idx") and (hasattr(m, "k_proj") and hasattr(m, "v_proj") or hasattr(m, "c_attn"))}
    if not found:
        raise IclcaError(f"no attention modules found in this {model.config.model_type!r} model",
                         f"iclca patches {', '.join(ROPE_FAMILIES)}-style decoders (q/k/v projections, rotary positions)")
    return found


def rotary_module(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    raise IclcaError(f"no rotary embedding module in this {model.config.model_type!r} model",
                     f"iclca patches {', '.join(ROPE_FAMILIES)}-style decoders with rotary positions")


def kv_shape(model) -> tuple[int, int]:
    """(key/value heads, head size)."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return kv_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@contextmanager
def capture_prompt_kv(model, with_queries: bool = True) -> Iterator[dict[str, tuple]]:
    """Yield {attention module path: (keys, values (B, Hkv, T, D), queries (B, H, T, D) or None)},
    filled by the next forward pass (keys and queries after the rotary embedding). Queries are kept
    only `with_queries` (the compressed fit needs them; they outweigh the keys and values)."""
    modules = attention_modules(model)
    before = model.config._attn_implementation
    captured: dict[str, tuple] = {}

    def keeper(name):
        def keep(key, value, query):
            captured[name] = (key, value, query if with_queries else None)

        return keep

    for name, m in modules.items():
        m._iclca_capture = keeper(name)
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield captured
    finally:
        model.set_attn_implementation(before)
        for m in modules.values():
            del m._iclca_capture


def _kmeans(x: torch.Tensor, C: int, iters: int = 20) -> torch.Tensor:
    """Cluster index of each row of x (N, D) among C clusters; deterministic (evenly spaced starts)."""
    centres = x[torch.linspace(0, x.shape[0] - 1, C).round().long()].clone()  # (C, D)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(-1)  # (N,)
        counts = torch.bincount(assign, minlength=C).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return torch.cdist(x, centres).argmin(-1)


def summarise(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, scaling: float, budget: int, ridge: float = 0.1):
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
    With budget >= P: the keys and values themselves, bias 0: exactly the prefix.
    """
    P = k.shape[0]
    if budget >= P:
        return k, v, torch.zeros(P, dtype=k.dtype, device=k.device)
    C = budget - 1
    unit = lambda x: x / x.norm(dim=-1).mean().clamp_min(1e-12)  # noqa: E731  (mean row norm 1)
    feats = torch.cat([unit(k[1:]), unit(v[1:])], dim=-1)  # (P-1, 2D): keys and values both count
    assign = _kmeans(feats, C)  # (P-1,)
    counts = torch.bincount(assign, minlength=C).to(k.dtype)  # (C,)
    mean = lambda x: torch.zeros(C, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, assign, x[1:]) / counts.clamp_min(1)[:, None]  # noqa: E731
    keys, values = torch.cat([k[:1], mean(k)]), torch.cat([v[:1], mean(v)])  # (R, D)
    bias = torch.cat([counts.new_zeros(1), torch.where(counts > 0, counts.clamp_min(1).log(), -math.inf)])  # (R,) empty: never attended
    # (N, D): attention over the whole prompt, CHUNK_TOKENS queries at a time ((N, P) scores at once would not fit for long prompts)
    target = torch.cat([torch.softmax(c @ k.T * scaling, -1) @ v for c in q.split(CHUNK_TOKENS)])
    w = torch.softmax(q @ keys.T * scaling + bias, -1)  # (N, R): attention over the summary
    gram = w.T @ w  # (R, R)
    lam = ridge * gram.diagonal().mean() * torch.eye(len(bias), dtype=w.dtype, device=w.device)
    values = torch.linalg.solve(gram + lam, w.T @ target + lam @ values)  # (R, D)
    return keys, values, bias


@torch.no_grad()
def convert_softmax(model, prompt_ids: list[int], method: str, budget: int = 0, order: int = 2) -> dict[str, torch.Tensor]:
    """Patch tensors of the prompt: prefix_keys/prefix_values (Hkv, P, D); for `compressed` also
    prefix_bias, with R = min(budget, P) entries per key/value head; for `taylor` the Taylor
    memories memory_kv (Hkv, F, D) and memory_k (Hkv, F) of the post-rotary keys."""
    if method not in SOFTMAX_METHODS:
        raise IclcaError(f"method {method!r} does not apply to {model.config.model_type!r} models",
                         f"use --method {' or '.join(SOFTMAX_METHODS)}")
    if method == "taylor" and order not in (1, 2):
        raise IclcaError(f"Taylor order {order} is not supported", "use --order 1 or --order 2")
    if method == "compressed" and budget < 2:
        raise IclcaError("method compressed needs a budget of at least 2 (the first token is kept apart)",
                         "pass --budget R, the entries per layer and key/value head (e.g. a third of the prompt's tokens)")
    device = next(model.parameters()).device
    with capture_prompt_kv(model, with_queries=method == "compressed") as captured:
        model.base_model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False)
    tensors = {}
    modules = attention_modules(model)
    for name, (k, v, q) in captured.items():
        k, v = k[0], v[0]  # (Hkv, P, D)
        if method == "taylor":
            F = taylor_feature_dim(k.shape[-1], order)
            S, z = k.new_zeros(k.shape[0], F, v.shape[-1]), k.new_zeros(k.shape[0], F)  # (Hkv, F, D), (Hkv, F)
            for kc, vc in zip(k.split(CHUNK_TOKENS, dim=1), v.split(CHUNK_TOKENS, dim=1)):
                phi = taylor_features(kc, modules[name].scaling, order)  # (Hkv, C, F): never (Hkv, P, F)
                S += phi.transpose(-1, -2) @ vc
                z += phi.sum(-2)
            tensors[f"{name}.memory_kv"], tensors[f"{name}.memory_k"] = S, z
            continue
        if method == "prefix":
            tensors[f"{name}.prefix_keys"], tensors[f"{name}.prefix_values"] = k.contiguous(), v.contiguous()
            continue
        q = q[0]  # (H, P, D)
        G = q.shape[0] // k.shape[0]
        scaling = modules[name].scaling
        heads = [summarise(k[h], v[h], q[h * G:(h + 1) * G].reshape(-1, q.shape[-1]), scaling, budget)
                 for h in range(k.shape[0])]
        tensors[f"{name}.prefix_keys"] = torch.stack([h[0] for h in heads]).contiguous()  # (Hkv, R, D)
        tensors[f"{name}.prefix_values"] = torch.stack([h[1] for h in heads]).contiguous()  # (Hkv, R, D)
        tensors[f"{name}.prefix_bias"] = torch.stack([h[2] for h in heads]).contiguous()  # (Hkv, R)
    return tensors


def entries(method: str, prompt_tokens: int, budget: int) -> int:
    return prompt_tokens if method == "prefix" else min(budget, prompt_tokens)


def expected_shapes(model, method: str, prompt_tokens: int, budget: int, order: int = 0) -> dict[str, tuple[int, ...]]:
    Hkv, D = kv_shape(model)
    R = entries(method, prompt_tokens, budget)
    shapes = {}
    for name in attention_modules(model):
        if method == "taylor":
            F = taylor_feature_dim(D, order)
            shapes[f"{name}.memory_kv"], shapes[f"{name}.memory_k"] = (Hkv, F, D), (Hkv, F)
            continue
        shapes[f"{name}.prefix_keys"] = shapes[f"{name}.prefix_values"] = (Hkv, R, D)
        if method == "compressed":
            shapes[f"{name}.prefix_bias"] = (Hkv, R)
    return shapes


@torch.no_grad()
def attach_rope_patch(model, tensors: dict[str, torch.Tensor], prompt_tokens: int) -> None:
    """Buffers on the attention modules, position ids shifted by P, attention switched to iclca's."""
    register_patch_buffers(model, tensors)
    shift_rotary(rotary_module(model), prompt_tokens)
    model.set_attn_implementation(ATTENTION_NAME)
