"""Any Hugging Face decoder with rotary positions that calls transformers' attention interface
(Llama, Qwen2, Mistral): capture a prompt's keys and values, turn them into a `prefix` (exact) or
`compressed` patch, and apply it, from the module structure and config alone.

- Capture: the model runs the prompt with its attention implementation switched to iclca's
  `patched_attention`, which records each attention module's (post-rotary) keys and values.
- Positions: a patched model's rotary embedding module gets a forward pre-hook that adds P to the
  position ids, so a query sits at positions P, P+1, ... as it would after the prompt.
- Grouped-query attention: patch tensors are per key/value head, (Hkv, R, D).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import IclcaError
from .models.modeling_iclca_gpt2 import ATTENTION_NAME

ROPE_FAMILIES = ("llama", "qwen2", "mistral")
ROPE_METHODS = ("prefix", "compressed")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> self-attention module: the modules with a `layer_idx` and k/v projections."""
    found = {n: m for n, m in model.named_modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "v_proj")}
    if not found:
        raise IclcaError(f"no attention modules found in this {model.config.model_type!r} model",
                         f"iclca patches {', '.join(ROPE_FAMILIES)}-style decoders (q/k/v projections, rotary positions)")
    return found


def rotary_module(model: nn.Module) -> nn.Module:
    for name, m in model.named_modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    raise IclcaError(f"no rotary embedding module in this {model.config.model_type!r} model",
                     f"iclca patches {', '.join(ROPE_FAMILIES)}-style decoders with rotary positions")


def kv_shape(model) -> tuple[int, int]:
    """(key/value heads, head size)."""
    c = model.config
    return c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@contextmanager
def capture_prompt_kv(model) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield {attention module path: (keys, values) (B, Hkv, T, D)}, filled by the next forward pass."""
    modules = attention_modules(model)
    before = model.config._attn_implementation
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in modules.values():
        m._iclca_capture = []
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield captured
    finally:
        model.set_attn_implementation(before)
        for name, m in modules.items():
            if m._iclca_capture:
                captured[name] = m._iclca_capture[-1]
            del m._iclca_capture


def kmeans_summary(k: torch.Tensor, v: torch.Tensor, budget: int, iters: int = 20):
    """Summarise one head's prompt keys/values (P, D) into `budget` (key, value, score bias) entries.

    The first token (an attention sink in most trained models) stays exact; the others are split
    into budget-1 clusters by k-means on the keys (deterministic: centres start at evenly spaced
    tokens). Each cluster gives its mean key, mean value and bias log(size), so that it stands for
    its members in the softmax: exp(q.c + log n) = n exp(q.c). With budget >= P it returns the keys
    and values themselves, bias 0: exactly the prefix.  -> keys (R, D), values (R, D), bias (R,)
    """
    P = k.shape[0]
    if budget >= P:
        return k, v, torch.zeros(P, dtype=k.dtype, device=k.device)
    rest_k, rest_v, C = k[1:], v[1:], budget - 1
    centres = rest_k[torch.linspace(0, rest_k.shape[0] - 1, C).round().long()].clone()  # (C, D)
    for _ in range(iters):
        assign = torch.cdist(rest_k, centres).argmin(-1)  # (P-1,)
        counts = torch.bincount(assign, minlength=C).to(k.dtype)  # (C,)
        sums = torch.zeros_like(centres).index_add_(0, assign, rest_k)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    assign = torch.cdist(rest_k, centres).argmin(-1)
    counts = torch.bincount(assign, minlength=C).to(k.dtype)
    keys = torch.zeros_like(centres).index_add_(0, assign, rest_k) / counts.clamp_min(1)[:, None]
    values = torch.zeros(C, v.shape[-1], dtype=v.dtype, device=v.device).index_add_(0, assign, rest_v)
    values = values / counts.clamp_min(1)[:, None]
    bias = torch.where(counts > 0, counts.clamp_min(1).log(), torch.full_like(counts, -math.inf))  # empty: never attended
    return torch.cat([k[:1], keys]), torch.cat([v[:1], values]), torch.cat([bias.new_zeros(1), bias])


@torch.no_grad()
def convert_rope(model, prompt_ids: list[int], method: str, budget: int = 0) -> dict[str, torch.Tensor]:
    """Patch tensors of the prompt: prefix_keys/prefix_values (Hkv, P, D), or for `compressed` also
    prefix_bias, with R = min(budget, P) entries per key/value head."""
    if method not in ROPE_METHODS:
        raise IclcaError(f"method {method!r} does not apply to {model.config.model_type!r} models",
                         f"use --method {' or '.join(ROPE_METHODS)}")
    if method == "compressed" and budget < 1:
        raise IclcaError("method compressed needs a budget of at least 1", "pass --budget R (entries per layer and head)")
    device = next(model.parameters()).device
    with capture_prompt_kv(model) as captured:
        model.base_model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False)
    tensors = {}
    for name, (k, v) in captured.items():
        k, v = k[0], v[0]  # (Hkv, P, D)
        if method == "prefix":
            tensors[f"{name}.prefix_keys"], tensors[f"{name}.prefix_values"] = k.contiguous(), v.contiguous()
            continue
        heads = [kmeans_summary(k[h], v[h], budget) for h in range(k.shape[0])]
        tensors[f"{name}.prefix_keys"] = torch.stack([h[0] for h in heads]).contiguous()  # (Hkv, R, D)
        tensors[f"{name}.prefix_values"] = torch.stack([h[1] for h in heads]).contiguous()  # (Hkv, R, D)
        tensors[f"{name}.prefix_bias"] = torch.stack([h[2] for h in heads]).contiguous()  # (Hkv, R)
    return tensors


def entries(method: str, prompt_tokens: int, budget: int) -> int:
    return prompt_tokens if method == "prefix" else min(budget, prompt_tokens)


def expected_shapes(model, method: str, prompt_tokens: int, budget: int) -> dict[str, tuple[int, ...]]:
    Hkv, D = kv_shape(model)
    R = entries(method, prompt_tokens, budget)
    shapes = {}
    for name in attention_modules(model):
        shapes[f"{name}.prefix_keys"] = shapes[f"{name}.prefix_values"] = (Hkv, R, D)
        if method == "compressed":
            shapes[f"{name}.prefix_bias"] = (Hkv, R)
    return shapes


def _shift_positions(module, args, kwargs):
    """Forward pre-hook on the rotary embedding: position ids + P."""
    offset = module.iclca_position_offset
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"] + offset
    else:
        args = (args[0], args[1] + offset, *args[2:])
    return args, kwargs


@torch.no_grad()
def attach_rope_patch(model, tensors: dict[str, torch.Tensor], prompt_tokens: int) -> None:
    """Buffers on the attention modules, position ids shifted by P, attention switched to iclca's."""
    dtype = next(model.parameters()).dtype
    for name, t in tensors.items():
        path, buffer = name.rsplit(".", 1)
        model.get_submodule(path).register_buffer(buffer, t.to(dtype).clone())
    rotary = rotary_module(model)
    if not hasattr(rotary, "iclca_position_offset"):
        rotary.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    rotary.iclca_position_offset = prompt_tokens
    model.set_attn_implementation(ATTENTION_NAME)
