"""Prompt -> patch for softmax attention (GPT-2): capture the prompt's keys and values with forward
hooks, then turn them into patch tensors, one function per method (DESIGN.md, "Softmax attention")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import IclcaError
from .models.modeling_iclca_gpt2 import attention_layers, taylor_feature_dim, taylor_features

SOFTMAX_METHODS = ("prefix", "taylor")


def head_shape(config) -> tuple[int, int]:
    """(heads, head size) of a GPT-2 config."""
    return config.num_attention_heads, config.hidden_size // config.num_attention_heads


@contextmanager
def capture_prompt_kv(model) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield {attention module path: (keys (B,H,T,D), values (B,H,T,D))} from hooks on each c_attn."""
    H, D = head_shape(model.config)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            B, T, _ = output.shape
            _, k, v = output.split(H * D, dim=2)  # 3 x (B, T, C)
            captured[name] = (k.view(B, T, H, D).transpose(1, 2).detach(), v.view(B, T, H, D).transpose(1, 2).detach())

        return hook

    handles = [attn.c_attn.register_forward_hook(keep(name)) for name, attn in attention_layers(model).items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def convert_softmax(model, prompt_ids: list[int], method: str, order: int = 2) -> dict[str, torch.Tensor]:
    """Patch tensors of the prompt for a GPT-2 model: `prefix` (exact) or `taylor` (order 1 or 2)."""
    if method not in SOFTMAX_METHODS:
        raise IclcaError(f"method {method!r} does not apply to GPT-2 models", f"use --method {' or '.join(SOFTMAX_METHODS)}")
    if method == "taylor" and order not in (1, 2):
        raise IclcaError(f"Taylor order {order} is not supported", "use --order 1 or --order 2")
    device = next(model.parameters()).device
    with capture_prompt_kv(model) as captured:
        model.base_model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=False)
    tensors = {}
    layers = attention_layers(model)
    for name, (k, v) in captured.items():
        k, v = k[0], v[0]  # (H, P, D)
        if method == "prefix":
            tensors[f"{name}.prefix_keys"] = k.contiguous()
            tensors[f"{name}.prefix_values"] = v.contiguous()
        else:
            phi = taylor_features(k, layers[name].scaling, order)  # (H, P, F)
            tensors[f"{name}.memory_kv"] = (phi.transpose(-1, -2) @ v).contiguous()  # (H, F, D)
            tensors[f"{name}.memory_k"] = phi.sum(-2).contiguous()  # (H, F)
    return tensors


def expected_shapes(model, method: str, prompt_tokens: int, order: int) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a GPT-2 patch of this method must have."""
    H, D = head_shape(model.config)
    shapes = {}
    for name in attention_layers(model):
        if method == "prefix":
            shapes[f"{name}.prefix_keys"] = shapes[f"{name}.prefix_values"] = (H, prompt_tokens, D)
        else:
            F = taylor_feature_dim(D, order)
            shapes[f"{name}.memory_kv"], shapes[f"{name}.memory_k"] = (H, F, D), (H, F)
    return shapes
