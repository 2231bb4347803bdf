"""Families whose every layer keeps its state in a transformers cache (`Family.positions == "cache"`: state-space,
linear-attention, short-convolution and hybrid models). Method `exact`: the prompt runs through the model chunk by
chunk, carrying its cache, and the cache it leaves is the patch: per decoder layer its convolution and recurrent
states, and an attention layer's keys and values (models/patched_cache.py puts them back for every sequence)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from .devices import input_device, module_device
from .families import Family
from .methods import Method
from .models.patched_cache import start_backbone_from_prompt
from .patch_buffers import buffer_specs
from .softmax_layers import capture_prompt_kv, patch_tensors

Progress = Callable[..., None]  # (tokens done, tokens in all[, a note: a training's loss])


def cache_tensors(cache, paths: list[str]) -> dict[str, torch.Tensor]:
    """'<layer path>.<state>' -> tensor without its batch dimension, for every state the cache holds."""
    if hasattr(cache, "rnn_state"):  # a model's own recurrent cache (xLSTM): per layer a tuple of states
        return {f"{path}.recurrent_state_{j}": t[0].contiguous()
                for path, states in zip(paths, cache.rnn_state.values()) for j, t in enumerate(states)}
    if isinstance(cache, (list, tuple)):  # RWKV: state j is (B, hidden, layers)
        return {f"{path}.recurrent_state_{j}": t[0, :, i].contiguous()
                for i, path in enumerate(paths) for j, t in enumerate(cache)}
    tensors = {}
    for path, layer in zip(paths, cache.layers):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for kind, states in (("conv_state", layer.conv_states), ("recurrent_state", layer.recurrent_states)):
                for j, t in states.items():
                    if t is not None and layer.has_previous_state[j]:
                        tensors[f"{path}.{kind}_{j}"] = t[0].contiguous()
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            tensors[f"{path}.prompt_keys"] = layer.keys[0].contiguous()  # (Hkv, P, D)
            tensors[f"{path}.prompt_values"] = layer.values[0].contiguous()
    return tensors


@torch.no_grad()
def run_prompt(model, prompt_ids: list[int], chunk_size: int = 512, progress: Progress | None = None,
               cache_kwarg: str = "cache"):
    """The model's cache after the prompt, run from the model's current state (a patched model starts from its
    patch) chunk by chunk: memory does not grow with P. The backbone alone: no (P, vocab) logits."""
    P = len(prompt_ids)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=input_device(model))  # (1, P)
    cache = None
    for start in range(0, P, chunk_size):
        out = model.base_model(input_ids=ids[:, start:start + chunk_size], use_cache=True, **{cache_kwarg: cache})
        cache = getattr(out, cache_kwarg)
        if progress is not None:
            progress(min(start + chunk_size, P), P)
    return cache


def attention_modules(model, family: Family) -> dict[str, torch.nn.Module]:
    """A hybrid's attention modules (Family.attention within each attention or hybrid layer), by path."""
    if family.attention is None:
        return {}
    kinds = family.layer_kinds(model.config)
    return {f"{path}.{family.attention}": model.get_submodule(f"{path}.{family.attention}")
            for path, kind in zip(family.layer_paths(model.config), kinds) if kind in ("full_attention", "hybrid")}


def convert(model, family: Family, prompt_ids: list[int], method: Method, chunk_size: int = 512,
            progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The states the cache holds after the prompt, by '<layer path>.<state>'. A family whose mixers cannot continue
    a multi-token call from a cache (`step_modules`) runs the prompt in one pass (memory grows with P).

    A method that summarises (compressed, evict): the attention layers' keys and values become its summaries
    (captured through iclca's attention function in one pass over method.capture_ids, the prompt and maybe its
    repeat), buffers of the attention modules; the recurrent states stay exact (from a pass over the prompt alone,
    when a repeat was read)."""
    if not method.summarises:
        chunk_size = len(prompt_ids) if family.step_modules else chunk_size
        cache = run_prompt(model, prompt_ids, chunk_size, progress, family.cache_kwarg)
        return cache_tensors(cache, family.layer_paths(model.config))
    ids = method.capture_ids(prompt_ids, None)
    with capture_prompt_kv(model, attention_modules(model, family)) as captured:
        cache = run_prompt(model, ids, len(ids), progress if ids == prompt_ids else None, family.cache_kwarg)
    if ids != prompt_ids:
        cache = run_prompt(model, prompt_ids, len(prompt_ids), progress, family.cache_kwarg)
    tensors = {n: t for n, t in cache_tensors(cache, family.layer_paths(model.config)).items()
               if not n.endswith(("prompt_keys", "prompt_values"))}
    tensors.update(patch_tensors(captured, len(prompt_ids), method))
    return tensors


@torch.no_grad()
def expected_shapes(model, family: Family, patch) -> dict[str, tuple[int, ...]]:
    """The shapes a patch must have: one token through the unpatched model shows every state's shape; keys and
    values hold the prompt's tokens (a sliding-window layer at most its window - 1), or a compressed patch's
    attention modules min(budget, P) entries per key/value head."""
    prompt_tokens = patch.prompt_tokens
    device = input_device(model)
    with capture_prompt_kv(model, attention_modules(model, family), with_queries=False) as captured:
        out = model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    cache = getattr(out, family.cache_kwarg)
    shapes = {name: tuple(t.shape) for name, t in cache_tensors(cache, family.layer_paths(model.config)).items()}
    if patch.method.summarises:
        shapes = {n: s for n, s in shapes.items() if not n.endswith(("prompt_keys", "prompt_values"))}
        for name, c in captured.items():
            shapes.update(patch.method.full_layer_shapes(patch, name, c.keys.shape[0], c.keys.shape[-1]))
        return shapes
    for path, layer in zip(family.layer_paths(model.config), getattr(cache, "layers", ())):
        window = getattr(layer, "sliding_window", None)
        for name in (f"{path}.prompt_keys", f"{path}.prompt_values"):
            if name in shapes:
                H, _, D = shapes[name]
                shapes[name] = (H, min(prompt_tokens, window - 1) if window else prompt_tokens, D)
    return shapes


def merged_config(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> dict:
    """What models/patched_cache.PatchedCacheModel reads from the config (a merged folder's, or a patched model's)."""
    return {"iclca_buffers": buffer_specs(tensors), "iclca_layer_paths": family.layer_paths(model.config),
            "iclca_position_offset": offset, "iclca_step_modules": family.step_modules,
            "iclca_count_positions": family.count_positions, "iclca_cache_class": family.cache_class,
            "iclca_cache_kwarg": family.cache_kwarg}


@torch.no_grad()
def attach(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> None:
    """The states become buffers on the decoder layers (each in its own dtype), and the backbone starts every
    sequence from them."""
    for name, t in tensors.items():
        path, buffer = name.rsplit(".", 1)
        module = model.get_submodule(path)
        module.register_buffer(buffer, t.to(module_device(module)).clone())
    for key, value in merged_config(model, family, tensors, offset).items():
        setattr(model.config, key, value)
    start_backbone_from_prompt(model)
