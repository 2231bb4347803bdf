"""Softmax-attention layers (full or sliding-window) of any family whose attention calls transformers' attention
interface: capture a prompt's keys and values, turn them into patch tensors by method, the shapes a patch must
have, and putting a patch on a model.

- Capture: the model runs the prompt with its attention implementation switched to iclca's (ops/softmax_attention),
  which hands each attention module's post-rotary keys, values (and queries) and how the layer attends.
- Per layer: a sliding-window layer keeps the prompt's last window-1 tokens exactly, whatever the method (nothing
  else could let entries expire as the query moves on); a full layer takes `prefix` (keys and values, exact),
  `compressed` or `evict` (about R entries per key/value head, summaries.py) or `taylor` (memories, ops/taylor.py).
- Grouped-query attention: patch tensors are per key/value head, (Hkv, R, D); a compressed layer whose heads hold
  different numbers of entries keeps them in one list, (1, E, D), with a bias per head (summaries.layer_tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .devices import input_device, module_device
from .errors import IclcaError
from .families import SOFTMAX_KINDS, Family
from .ops import compress
from .ops.compress import Options
from .ops.softmax_attention import ATTENTION_NAME
from .ops.taylor import taylor_feature_dim, taylor_features
from .patch_buffers import buffer_specs
from .positions import position_table, rotary_modules, start_queries_at
from .summaries import SUMMARY_METHODS, capture_ids, summary_tensors



@dataclass
class Captured:
    """One attention layer's view of the prompt."""

    keys: torch.Tensor  # (Hkv, P, D), after the rotary embedding
    values: torch.Tensor  # (Hkv, P, D)
    queries: torch.Tensor | None  # (H, P, D), kept only when asked (they outweigh keys and values)
    scaling: float
    sliding_window: int | None
    softcap: float | None


def attention_modules(model: nn.Module, family: Family) -> dict[str, nn.Module]:
    """Module path -> attention module of every softmax layer (by config.layer_types, or the family's rule)."""
    kinds = family.layer_kinds(model.config)
    return {path: model.get_submodule(path) for path, kind in zip(family.layer_paths(model.config), kinds)
            if kind in SOFTMAX_KINDS}


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head size)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@contextmanager
def capture_prompt_kv(model, modules: dict[str, nn.Module], with_queries: bool = True) -> Iterator[dict[str, Captured]]:
    """Yield {attention module path: Captured}, filled by the model's forward passes (batch 1; the last call
    of each module wins)."""
    captured: dict[str, Captured] = {}
    if not modules:  # nothing to capture (a model without attention layers): leave the model alone
        yield captured
        return
    before = model.config._attn_implementation

    def keeper(name):
        def keep(key, value, query, scaling, sliding_window, softcap):
            captured[name] = Captured(key[0], value[0], query[0] if with_queries else None, scaling, sliding_window,
                                      softcap)

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


def window_entries(prompt_tokens: int, sliding_window: int) -> int:
    """Prompt tokens a sliding-window layer can still show a query: the last window-1."""
    return min(prompt_tokens, sliding_window - 1)


def layer_tensors(c: Captured, method: str, budget: int, order: int) -> dict[str, torch.Tensor]:
    """Patch tensors of one layer, by buffer name."""
    k, v = c.keys, c.values  # (Hkv, P, D)
    if c.sliding_window is not None:
        R = window_entries(k.shape[-2], c.sliding_window)
        return {"prefix_keys": k[:, -R:].contiguous(), "prefix_values": v[:, -R:].contiguous()}
    if method == "prefix":
        return {"prefix_keys": k.contiguous(), "prefix_values": v.contiguous()}
    if k.dtype in (torch.bfloat16, torch.float16):  # Taylor sums in float32, stored as the model computes
        work = dataclasses.replace(c, keys=k.float(), values=v.float())
        return {name: t.to(k.dtype) for name, t in layer_tensors(work, method, budget, order).items()}
    if method == "taylor":
        if c.softcap is not None:
            raise IclcaError("Taylor memories cannot express soft-capped attention scores",
                             "use --method prefix or --method compressed for this model")
        F = taylor_feature_dim(k.shape[-1], order)
        S, z = k.new_zeros(k.shape[0], F, v.shape[-1]), k.new_zeros(k.shape[0], F)  # (Hkv, F, D), (Hkv, F)
        for kc, vc in zip(k.split(compress.CHUNK_TOKENS, dim=1), v.split(compress.CHUNK_TOKENS, dim=1)):
            phi = taylor_features(kc, c.scaling, order)  # (Hkv, C, F): never (Hkv, P, F)
            S += phi.transpose(-1, -2) @ vc
            z += phi.sum(-2)
        return {"memory_kv": S, "memory_k": z}
    raise ValueError(f"layer_tensors does not make {method!r} tensors (summaries.summary_tensors does)")


def check_method_arguments(method: str, budget: int, order: int) -> None:
    if method == "taylor" and order not in (1, 2):
        raise IclcaError(f"Taylor order {order} is not supported", "use --order 1 or --order 2")
    if method in SUMMARY_METHODS and budget < 2:
        raise IclcaError(f"method {method} needs a budget of at least 2 (the first token is kept apart)",
                         "pass --budget R, the entries per layer and key/value head (e.g. a third of the prompt's tokens)")


def positions_left(model, family: Family) -> int | None:
    """Positions a learned position table has (a repeat of the prompt must fit in), or None: no limit."""
    table = position_table(model, family)
    return None if table is None else table.num_embeddings


def patch_tensors(captured: dict[str, Captured], prompt_tokens: int, method: str, budget: int, order: int,
                  options: Options) -> dict[str, torch.Tensor]:
    """'<attention module path>.<buffer>' -> tensor, from layers captured over capture_ids (the prompt's first
    `prompt_tokens` tokens, maybe a repeat after them): summaries for the full-attention layers of `compressed` and
    `evict`, layer_tensors for the others."""
    summarised = {n: c for n, c in captured.items() if method in SUMMARY_METHODS and c.sliding_window is None}
    tensors = {f"{name}.{buffer}": t for name, bufs in
               (summary_tensors(summarised, prompt_tokens, method, budget, options) if summarised else {}).items()
               for buffer, t in bufs.items()}
    for name, c in captured.items():
        if name not in summarised:
            prompt = dataclasses.replace(c, keys=c.keys[:, :prompt_tokens], values=c.values[:, :prompt_tokens])
            tensors.update({f"{name}.{buffer}": t for buffer, t in layer_tensors(prompt, method, budget, order).items()})
    return tensors


@torch.no_grad()
def convert_softmax(model, family: Family, prompt_ids: list[int], method: str, budget: int = 0,
                    order: int = 2, options: Options = Options()) -> dict[str, torch.Tensor]:
    """Patch tensors '<attention module path>.<buffer>' of the prompt for every softmax layer."""
    check_method_arguments(method, budget, order)
    summarised = method in SUMMARY_METHODS
    ids = capture_ids(prompt_ids, options, positions_left(model, family)) if summarised else prompt_ids
    with capture_prompt_kv(model, attention_modules(model, family), with_queries=summarised) as captured:
        model.base_model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False)
    return patch_tensors(captured, len(prompt_ids), method, budget, order, options)


def expected_shapes(model, family: Family, patch) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape a patch of this method must have for this model."""
    method, prompt_tokens = patch.method, patch.prompt_tokens
    order = int(patch.extra.get("taylor_order", 0))
    Hkv, D = kv_shape(model.config)
    shapes = {}
    kinds = family.layer_kinds(model.config)
    for path, kind in zip(family.layer_paths(model.config), kinds):
        if kind == "sliding_attention":
            R = window_entries(prompt_tokens, model.config.sliding_window)
            shapes[f"{path}.prefix_keys"] = shapes[f"{path}.prefix_values"] = (Hkv, R, D)
        elif method == "taylor":
            F = taylor_feature_dim(D, order)
            shapes[f"{path}.memory_kv"], shapes[f"{path}.memory_k"] = (Hkv, F, D), (Hkv, F)
        elif kind == "full_attention" and method == "prefix":
            shapes[f"{path}.prefix_keys"] = shapes[f"{path}.prefix_values"] = (Hkv, prompt_tokens, D)
        elif kind == "full_attention":
            shapes.update(summary_shapes(patch, path, Hkv, D))
    return shapes


def summary_shapes(patch, module: str, Hkv: int, D: int) -> dict[str, tuple[int, ...]]:
    """Shapes of an `evict` or `compressed` layer's buffers ('<module>.<buffer>'). evict and uniform budgets: R =
    min(budget, P) per key/value head. A split by layers: the layer's R, as its tensor says, up to the grid's top;
    by heads: the same, or the heads' entries in one list, (1, E, D) with E up to Hkv x the grid's top
    (summaries.layer_tensors)."""
    budget = int(patch.extra.get("budget", 0))
    R = min(budget, patch.prompt_tokens)
    keys = patch.tensors.get(f"{module}.prefix_keys")
    shared = 1 if keys is not None and keys.dim() == 3 and keys.shape[0] == 1 else Hkv
    if patch.method == "compressed" and Options.from_metadata(patch.extra).split != "uniform" and keys is not None:
        held = keys.shape[-2] if keys.dim() == 3 else -1
        top = compress.budget_grid(budget, patch.prompt_tokens)[-1] * (Hkv // shared)
        R = held if 1 <= held <= top else R
    shapes = {f"{module}.prefix_keys": (shared, R, D), f"{module}.prefix_values": (shared, R, D)}
    if patch.method == "compressed":
        shapes[f"{module}.prefix_bias"] = (Hkv, R)
    return shapes


@torch.no_grad()
def register_patch_buffers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put patch tensors ('<module path>.<buffer>') on their modules as buffers, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    for name, t in tensors.items():
        path, buffer = name.rsplit(".", 1)
        module = model.get_submodule(path)
        module.register_buffer(buffer, t.to(device=module_device(module), dtype=dtype).clone())


def merged_config(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> dict:
    """What models/patched_decoder.PatchedDecoder reads from a merged folder's config."""
    rotary = sorted(rotary_modules(model)) if family.positions == "rotary" else []
    return {"iclca_buffers": buffer_specs(tensors), "iclca_position_offset": offset, "iclca_rotary_modules": rotary}


def attach(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> None:
    """Buffers on the attention modules, queries starting at `offset`, attention switched to iclca's."""
    register_patch_buffers(model, tensors)
    start_queries_at(model, family, offset)
    model.set_attn_implementation(ATTENTION_NAME)
