"""Summaries of a model's full-attention layers (methods compressed and evict): what to run (the prompt, and a repeat
of it for the reference queries), the captured heads as one batch, the budget split across layers and heads, and the
layers' patch tensors (ops/compress.py fits).

A layer whose heads hold R entries each has tensors (Hkv, R, D); a layer whose heads took different budgets (a
split by heads) keeps its heads' entries in one list, (1, E, D), with a bias per head that hides the other heads'
entries (layer_tensors). The budget is the average entries per layer and key/value head: a split holds as many
entries in all as a uniform budget would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .ops import compress


def repeat_ids(prompt_ids: list[int], positions_left: int | None) -> list[int]:
    """The prompt and a second copy right after it (as much as a learned position table leaves room for): the
    repeat's queries are the look-ups a later question makes into the prompt, at the right distance."""
    repeat = len(prompt_ids) if positions_left is None else max(0, min(len(prompt_ids), positions_left - len(prompt_ids)))
    return list(prompt_ids) + list(prompt_ids[:repeat])


@dataclass
class Heads:
    """Every summarised key/value head of a model, layer after layer (row l * Hkv + h), fitted as one batch."""

    names: list[str]  # the layers
    keys: torch.Tensor  # (B, P, D), B = layers * Hkv
    values: torch.Tensor  # (B, P, D)
    ref: compress.Reference
    scaling: torch.Tensor  # (B, 1, 1): each head's layer's
    softcap: float | None
    dtype: torch.dtype  # the model's: what the patch stores
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # {weigh: (B,) each head's layer's
    # Captured.weights[weigh]}; a weigh missing: unknown (all heads alike)
    ranked_at: list[int] = dataclasses.field(default_factory=list)  # the budgets of ref.ranked

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer."""
        return len(self.keys) // len(self.names)

    def rows(self, index: list[int]) -> tuple:
        """(keys, values, Reference, scaling) of these heads (views where they are consecutive)."""
        at = slice(index[0], index[-1] + 1) if index == list(range(index[0], index[-1] + 1)) else torch.tensor(index)
        ref = compress.Reference(*(getattr(self.ref, f.name)[at] for f in dataclasses.fields(self.ref)))
        return self.keys[at], self.values[at], ref, self.scaling[at]

    def summarise(self, budgets: list[int], keys: str, heads: list[int] | None = None) -> dict[int, dict[int, compress.Summary]]:
        """{budget: {head: its Summary (a batch of one)}} at each of `budgets`, for these heads (default: all), fitted
        in batches of heads whose (N, largest budget) scores stay under FIT_ELEMENTS."""
        fitted = [b for b in budgets if b < self.keys.shape[1]] or [1]  # the whole prompt is kept, not fitted
        out = {b: {} for b in budgets}
        for batch, (k, v, ref, scaling) in self.batches(max(fitted), heads):
            for b, s in compress.summarise(k, v, ref, budgets, scaling, self.softcap, keys).items():
                out[b].update({h: _one(s, j) for j, h in enumerate(batch)})
        return out

    def ranked_errors(self, budgets: list[int]) -> torch.Tensor:
        """(B, len(budgets)) evict's output error of every head at each budget: ref.ranked where the reference was
        given these budgets (captured_heads), or compress.ranked_errors (a few heads at a time, as the reference)."""
        if budgets == self.ranked_at:
            return self.ref.ranked
        return compress.ranked_errors(self.keys, self.values, self.ref, budgets, self.scaling, self.softcap)

    def batches(self, width: int, heads: list[int] | None = None):
        """(a batch of these heads (default: all), its rows) in batches whose (N, width) scores stay under
        FIT_ELEMENTS."""
        heads = list(range(len(self.keys))) if heads is None else heads
        step = max(1, FIT_ELEMENTS // (self.ref.queries.shape[1] * width))
        for i in range(0, len(heads), step):
            yield heads[i:i + step], self.rows(heads[i:i + step])


FIT_ELEMENTS = 1 << 25  # reference queries x entries per fitting step (a few hundred MB at most)


def captured_heads(captured: dict, prompt_tokens: int, ranked_at: list[int] = ()) -> Heads:
    """The captured full-attention layers' prompt keys, values and reference queries, in float32 at least; evict's
    error at each budget of `ranked_at` from the same pass (Heads.ranked_errors)."""
    keys, values, refs, scalings = [], [], [], []
    softcaps = {c.softcap for c in captured.values()}
    if len(softcaps) > 1:
        raise NotImplementedError(f"layers with different soft caps ({sorted(map(str, softcaps))}) in one model")
    for name, c in captured.items():
        k, v, q = c.keys[:, :prompt_tokens], c.values[:, :prompt_tokens], c.queries  # (Hkv, P, D), (H, T, D)
        if k.dtype in (torch.bfloat16, torch.float16):  # fits in float32, stored as the model computes
            k, v, q = k.float(), v.float(), q.float()
        Hkv, G = k.shape[0], q.shape[0] // k.shape[0]
        pooled = q.reshape(Hkv, G * q.shape[1], q.shape[-1])  # (Hkv, G*T, D): a group's query heads pooled
        keys.append(k), values.append(v), scalings.append(torch.full((Hkv, 1, 1), c.scaling, dtype=k.dtype))
        refs.append(compress.reference(k, v, pooled, c.scaling, c.softcap, list(ranked_at)))
    ref = compress.Reference.joined(refs)
    first = next(iter(captured.values()))
    weights = {}  # {weigh: (B,)}, where every layer's weight is known
    for weigh in first.weights:
        per_layer = [c.weights.get(weigh) for c in captured.values()]
        if None not in per_layer:
            per_layer = torch.tensor(per_layer, dtype=torch.float64, device=first.keys.device)
            weights[weigh] = per_layer.repeat_interleave(len(first.keys))  # each layer's Hkv heads
    return Heads(list(captured), torch.cat(keys), torch.cat(values), ref, torch.cat(scalings).to(first.keys.device),
                 softcaps.pop(), first.keys.dtype, weights, list(ranked_at))


def layer_tensors(summaries: list[compress.Summary], dtype) -> dict[str, torch.Tensor]:
    """One layer's heads (each a Summary of one head) -> its buffers. Heads of one budget: keys and values
    (Hkv, R, D), bias (Hkv, R). Heads of different budgets (a split by heads): every head's entries in one shared list,
    keys and values (1, E, D) with E the heads' budgets summed, and a bias per head (Hkv, E) that is PAD_BIAS on
    the other heads' entries: each query head attends to its key/value head's entries only, and the layer holds
    no unused slots."""
    if len({s.keys.shape[1] for s in summaries}) == 1:
        return {"prefix_keys": torch.cat([s.keys for s in summaries]).to(dtype),
                "prefix_values": torch.cat([s.values for s in summaries]).to(dtype),
                "prefix_bias": torch.cat([s.bias for s in summaries]).to(dtype)}
    widths = [s.keys.shape[1] for s in summaries]
    bias = torch.full((len(summaries), sum(widths)), compress.PAD_BIAS, dtype=summaries[0].bias.dtype,
                      device=summaries[0].bias.device)
    start = 0
    for h, (s, width) in enumerate(zip(summaries, widths)):
        bias[h, start:start + width] = s.bias[0]
        start += width
    return {"prefix_keys": torch.cat([s.keys for s in summaries], 1).to(dtype),
            "prefix_values": torch.cat([s.values for s in summaries], 1).to(dtype), "prefix_bias": bias.to(dtype)}


def head_entries(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """{summarised layer: the entries each of its key/value heads holds} (the layers with a prefix_bias)."""
    return {name.removesuffix(".prefix_bias"): compress.own_entries(bias).sum(-1).tolist()
            for name, bias in sorted(tensors.items()) if name.endswith(".prefix_bias")}


def compressed_tensors(captured: dict, prompt_tokens: int, budget: int, keys: str = "attention",
                       split: str = "heads", search: str = "ranked", weigh: str = "leaving",
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """{full-attention layer: {buffer: tensor}} of a `compressed` patch of `budget` entries per layer and key/value
    head (on average, with a split by layers or heads), keys chosen by `keys`. captured: the layers' Captured."""
    heads = captured_heads(captured, prompt_tokens, ranked_grid(budget, prompt_tokens, split, search))
    Hkv = heads.kv_heads
    per_head, fits = head_budgets(heads, budget, keys, split, search, weigh)
    return {name: layer_tensors([fits[per_head[i * Hkv + h]][i * Hkv + h] for h in range(Hkv)], heads.dtype)
            for i, name in enumerate(heads.names)}


def search_grids(budget: int, prompt_tokens: int, split: str, search: str) -> tuple[list[int], list[int]]:
    """(the budgets a split by layers or heads chooses from (compress.budget_grid), those every head is fitted at:
    all of them (search fitted), or those up to half the budget or CHEAP_FIT entries (ranked))."""
    grid = compress.budget_grid(budget, prompt_tokens, free=split == "free")
    return grid, grid if search == "fitted" else [b for b in grid if b <= max(compress.CHEAP_FIT, budget // 2)]


def ranked_grid(budget: int, prompt_tokens: int, split: str, search: str) -> list[int]:
    """The budgets whose evict error a split weighs (head_budgets): the last one fitted and those above it; none for a
    uniform split, a budget of the whole prompt, or a grid fitted in full."""
    if split == "uniform" or budget >= prompt_tokens:
        return []
    grid, fitted = search_grids(budget, prompt_tokens, split, search)
    return grid[len(fitted) - 1:] if len(fitted) < len(grid) else []


def head_budgets(heads: Heads, budget: int, keys: str = "attention", split: str = "heads", search: str = "ranked",
                 weigh: str = "leaving") -> tuple[list[int], dict[int, dict[int, compress.Summary]]]:
    """(each head's budget under `split`, {budget: {head: Summary}} fitted on the way: every head at each budget it
    holds). split: uniform, layers (whole layers move together), heads (each head up to the grid's top, about GRID_TOP
    x the budget: compress.budget_grid) or free (each head anything from its sink alone to its whole prompt as it is,
    exact: a retrieval head kept whole). search: the error the split weighs, each head's fitted error at every budget
    of the grid (fitted), or (ranked) the fitted error up to half the budget or CHEAP_FIT entries and above it evict's
    error (from the reference pass: Heads.ranked_errors), scaled to meet the fitted error at the last budget fitted;
    then only the budgets the heads take are fitted (search_grids). weigh: leaving or residual, each head's error x
    its weight (Heads.weights[weigh]: an error in layer 0 moves the model more than one in a late layer, whose residual
    stream is larger; measured on the stream leaving the layer or entering it); none, as it is."""
    P, L, Hkv = heads.keys.shape[1], len(heads.names), heads.kv_heads
    if split == "uniform" or budget >= P:
        per_head = [min(budget, P)] * len(heads.keys)
        return per_head, heads.summarise(per_head[:1], keys)
    grid, fitted = search_grids(budget, P, split, search)
    fits = heads.summarise(fitted, keys)
    errors = torch.stack([torch.cat([fits[b][h].error for h in range(len(heads.keys))]) for b in fitted], -1)  # (B, G)
    if len(fitted) < len(grid):  # ranked: evict's error above, scaled to meet the fitted error at the last fitted budget
        ranked = heads.ranked_errors(ranked_grid(budget, P, split, search))  # (B, 1 + the budgets above)
        scale = torch.where(ranked[:, 0] > 0, errors[:, -1] / ranked[:, 0].clamp_min(1e-30), 1.0)  # (B,)
        errors = torch.cat([errors, ranked[:, 1:] * scale[:, None]], -1)
    if weigh in heads.weights:
        errors = errors * heads.weights[weigh][:, None].to(errors.dtype)
    if split == "layers":  # whole layers: Hkv heads move together
        per_layer = compress.split_budget(errors.view(L, Hkv, -1).sum(1), grid, Hkv, budget * L * Hkv)
        per_head = [b for b in per_layer for _ in range(Hkv)]
    else:
        per_head = compress.split_budget(errors, grid, 1, budget * L * Hkv)
    for b in sorted(set(per_head) - set(fits)):  # budgets not fitted yet: only the heads that took them
        fits.update(heads.summarise([b], keys, [h for h, hb in enumerate(per_head) if hb == b]))
    return per_head, fits


def _one(s: compress.Summary, h: int) -> compress.Summary:
    """Head h of a batched Summary, as a Summary of one head."""
    return dataclasses.replace(s, keys=s.keys[h:h + 1], values=s.values[h:h + 1],
                               bias=None if s.bias is None else s.bias[h:h + 1], error=s.error[h:h + 1])


# ---- the summary layer in research: a prompt's heads, and a model patched with any summary per head ----
# (documented in docs/python-api.md; scripts/research/ use these, not the handlers)

def prompt_heads(model, prompt_ids: list[int], method=None) -> Heads:
    """Every full-attention head of `model` on this prompt, as `compressed` (or `method`, one that summarises) fits
    them: its keys and values, and the reference queries (by default those of a repeat of the prompt)."""
    from .families import family_of
    from .methods.compressed import Compressed
    from .softmax_layers import capture

    captured = capture(model, family_of(model), prompt_ids, method or Compressed(budget=2))
    full = {n: c for n, c in captured.items() if c.sliding_window is None}
    return captured_heads(full, len(prompt_ids))


def patched_with(model, heads: Heads, chosen: list[compress.Summary], prompt_tokens: int):
    """A copy of `model` (sharing its weights) whose full-attention heads attend to chosen[row] (a Summary of one
    head, row = layer * Hkv + head) in place of the prompt; any mix of budgets, fitted or exact, per head. For
    models whose attention layers are all full (sliding-window layers are not patched here)."""
    from .families import family_of
    from .patch import shared_copy
    from .softmax_layers import attach

    Hkv = heads.kv_heads
    tensors = {f"{name}.{buffer}": t for i, name in enumerate(heads.names)
               for buffer, t in layer_tensors(chosen[i * Hkv:(i + 1) * Hkv], heads.dtype).items()}
    patched = shared_copy(model)
    attach(patched, family_of(patched), tensors, prompt_tokens)
    return patched

