"""Softmax-attention layers (full or sliding-window) of any family whose attention calls transformers' attention
interface: capture a prompt's keys and values, turn them into patch tensors by method, the shapes a patch must
have, and putting a patch on a model.

- Capture: the model runs the prompt with its attention implementation switched to iclca's (ops/softmax_attention),
  which hands each attention module's post-rotary keys, values (and queries) and how the layer attends.
- Per layer: a sliding-window layer keeps the prompt's last window-1 tokens exactly, whatever the method (nothing
  else could let entries expire as the query moves on); a full layer takes what the method makes of its keys and
  values (methods/: one layer at a time, or all of them at once for a method that summarises).
- Grouped-query attention: patch tensors are per key/value head, (Hkv, R, D); a compressed layer whose heads hold
  different numbers of entries keeps them in one list, (1, E, D), with a bias per head (summaries.layer_tensors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .devices import input_device, module_device
from .families import SOFTMAX_KINDS, Family
from .methods import Method
from .ops.softmax_attention import ATTENTION_NAME
from .patch_buffers import buffer_specs
from .positions import position_table, rotary_modules, start_queries_at


@dataclass
class Captured:
    """One attention layer's view of the prompt."""

    keys: torch.Tensor  # (Hkv, P, D), after the rotary embedding
    values: torch.Tensor  # (Hkv, P, D)
    queries: torch.Tensor | None  # (H, P, D), kept only when asked (they outweigh keys and values)
    scaling: float
    sliding_window: int | None
    softcap: float | None
    weights: dict[str, float | None] = field(default_factory=dict)  # {weigh: residual_weight}, how much an error in
    # its attention output moves the residual stream, relative to the stream entering (residual) or leaving the layer


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
    of each module wins). With queries, each layer also gets its weights (residual_weight) once the pass is over."""
    captured: dict[str, Captured] = {}
    if not modules:  # nothing to capture (a model without attention layers): leave the model alone
        yield captured
        return
    before = model.config._attn_implementation
    powers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}  # per layer, each (T,): residual_weight's

    def keeper(name):
        def keep(key, value, query, output, scaling, sliding_window, softcap):
            captured[name] = Captured(key[0], value[0], query[0] if with_queries else None, scaling, sliding_window,
                                      softcap)
            if with_queries:  # a summarising method: residual_weight's (T,), every head's output together
                powers[name]["attention"] = output[0].double().pow(2).sum((-2, -1))

        return keep

    def power(name, kind):
        def record(tensor):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 and len(tensor) == 1:
                powers[name][kind] = tensor[0].detach().double().pow(2).sum(-1)  # (T,)

        return record

    first = lambda y: y[0] if isinstance(y, tuple) else y  # noqa: E731  (a module's output, or its first)
    hooks = []
    for name, m in modules.items():
        m._iclca_capture = keeper(name)
        if with_queries and "." in name:
            out, residual, leaving = power(name, "output"), power(name, "residual"), power(name, "leaving")
            parent = model.get_submodule(name.rsplit(".", 1)[0])  # its decoder layer
            hooks.append(m.register_forward_hook(lambda _m, _a, y, out=out: out(first(y))))
            hooks.append(parent.register_forward_pre_hook(
                lambda _m, a, kw, residual=residual: residual(a[0] if a else kw.get("hidden_states")), with_kwargs=True))
            hooks.append(parent.register_forward_hook(lambda _m, _a, y, leaving=leaving: leaving(first(y))))
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield captured
        for name, c in list(captured.items()) if with_queries else ():
            got = powers[name]  # the stream entering the layer (residual) or leaving it
            captured[name] = dataclasses.replace(c, weights={
                stream: residual_weight(got.get("attention"), got.get("output"), got.get(stream))
                for stream in ("residual", "leaving")})
    finally:
        model.set_attn_implementation(before)
        for h in hooks:
            h.remove()
        for m in modules.values():
            del m._iclca_capture


def residual_weight(attention: torch.Tensor | None = None, output: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> float | None:
    """How much a squared error in a layer's attention output moves the residual stream it is added to, relative
    to the stream: the output projection's gain (the module's output power over the attention output's) x the mean
    over tokens of 1 / the residual's power (the stream entering the layer, or leaving it). Each argument (T,): a
    token's squared norm. None where the hooks did not see all three alike (a layer whose parent module does not take
    or return the residual stream first). Assumes the
    module's output is added to the stream as it is (a post-attention norm, as Gemma's, makes it a rougher proxy)."""
    if attention is None or output is None or residual is None or not attention.shape == output.shape == residual.shape:
        return None
    attended = float(attention.sum())  # floats: the three may sit on different devices
    weight = float(output.sum()) / attended * float(residual.reciprocal().mean()) if attended > 0 else math.nan
    return weight if 0 < weight < math.inf else None


def window_entries(prompt_tokens: int, sliding_window: int) -> int:
    """Prompt tokens a sliding-window layer can still show a query: the last window-1."""
    return min(prompt_tokens, sliding_window - 1)


def layer_tensors(c: Captured, method: Method) -> dict[str, torch.Tensor]:
    """Patch tensors of one layer, by buffer name: a sliding-window layer's last window-1 keys and values, or what
    the method makes of a full layer's."""
    if c.sliding_window is not None:
        R = window_entries(c.keys.shape[-2], c.sliding_window)
        return {"prefix_keys": c.keys[:, -R:].contiguous(), "prefix_values": c.values[:, -R:].contiguous()}
    return method.full_layer_tensors(c)


def positions_left(model, family: Family) -> int | None:
    """Positions a learned position table has (a repeat of the prompt must fit in), or None: no limit."""
    table = position_table(model, family)
    return None if table is None else table.num_embeddings


def patch_tensors(captured: dict[str, Captured], prompt_tokens: int, method: Method) -> dict[str, torch.Tensor]:
    """'<attention module path>.<buffer>' -> tensor, from layers captured over method.capture_ids (the prompt's
    first `prompt_tokens` tokens, maybe a repeat after them): the method's summaries of the full-attention layers
    where it summarises, layer_tensors for the others."""
    summarised = {n: c for n, c in captured.items() if method.summarises and c.sliding_window is None}
    tensors = {f"{name}.{buffer}": t for name, bufs in
               (method.summary_tensors(summarised, prompt_tokens) if summarised else {}).items()
               for buffer, t in bufs.items()}
    for name, c in captured.items():
        if name not in summarised:
            prompt = dataclasses.replace(c, keys=c.keys[:, :prompt_tokens], values=c.values[:, :prompt_tokens])
            tensors.update({f"{name}.{buffer}": t for buffer, t in layer_tensors(prompt, method).items()})
    return tensors


@torch.no_grad()
def capture(model, family: Family, prompt_ids: list[int], method: Method) -> dict[str, Captured]:
    """{attention module path: Captured} over method.capture_ids (the prompt, maybe a repeat after it), one pass."""
    ids = method.capture_ids(prompt_ids, positions_left(model, family))
    with capture_prompt_kv(model, attention_modules(model, family), with_queries=method.summarises) as captured:
        model.base_model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False)
    return captured


@torch.no_grad()
def convert(model, family: Family, prompt_ids: list[int], method: Method, chunk_size: int = 512,
            progress=None) -> dict[str, torch.Tensor]:
    """Patch tensors '<attention module path>.<buffer>' of the prompt for every softmax layer (one pass: the
    chunk size does not apply)."""
    captured = capture(model, family, prompt_ids, method)
    if progress is not None:
        progress(len(prompt_ids), len(prompt_ids))
    return patch_tensors(captured, len(prompt_ids), method)


def expected_shapes(model, family: Family, patch) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape a patch of this method must have for this model."""
    Hkv, D = kv_shape(model.config)
    shapes = {}
    for path, kind in zip(family.layer_paths(model.config), family.layer_kinds(model.config)):
        if kind == "sliding_attention":
            R = window_entries(patch.prompt_tokens, model.config.sliding_window)
            shapes[f"{path}.prefix_keys"] = shapes[f"{path}.prefix_values"] = (Hkv, R, D)
        elif kind == "full_attention":
            shapes.update(patch.method.full_layer_shapes(patch, path, Hkv, D))
    return shapes


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
