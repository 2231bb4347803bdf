"""Softmax attention with a prompt folded in, as a transformers AttentionInterface function.

For a query q the prompt's part of softmax attention is
    N(q) = sum_j exp(x_j) v_j ,   D(q) = sum_j exp(x_j),   x_j = cap(s q.k_j) (+ b_j)
and the output is (N(q) + sum_{query j} ...) / (D(q) + sum_{query j} ...). The prompt part comes from buffers on
the attention module:
- prefix_keys / prefix_values (Hkv, R, D), and a score bias prefix_bias (Hkv, R) for a compressed summary: N and D
  over R stored entries (R = P: exact);
- memory_kv (Hkv, F, D) / memory_k (Hkv, F): Taylor memories, exp(s q.k) ~ phi(q).phi(k) (ops/taylor.py).
`cap` is logit soft-capping (Gemma 2: softcap * tanh(x / softcap)). On a sliding-window layer the prefix holds the
prompt's last R tokens, at positions -R..-1 relative to the first query token, and a query at position p sees
entry j only while p - (j - R) < window, as transformers' sliding masks do.

`patched_attention_reference` is the definition in one piece (both parts concatenated, an explicit mask), the
naive reference the fast form is tested against. Needs torch and transformers only: travels into merged folders.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .taylor import taylor_features, taylor_kernel, taylor_order_of

ATTENTION_NAME = "iclca_patch"
# Keyword arguments transformers' attention modules pass that do not change the result here.
IGNORED_KWARGS = ("use_cache", "output_attentions", "output_hidden_states", "output_router_logits")  # what is returned


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: (..., Hkv, T, D) or (Hkv, T) -> H heads
    (head h uses key/value head h // (H / Hkv), as transformers' repeat_kv)."""
    dim = x.dim() - 3 if x.dim() >= 3 else 0
    n = x.shape[dim]
    return x if n == heads else x.repeat_interleave(heads // n, dim=dim)


def _grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, K) @ y (Hkv, K, N), head h using y[h // (H / Hkv)], without repeating y per head:
    the G = H / Hkv query heads of a group become one (G*T)-row batch. -> (B, H, T, N)"""
    B, H, T, K = x.shape
    Hkv = y.shape[0]
    if Hkv == H:
        return x @ y
    return (x.reshape(B, Hkv, (H // Hkv) * T, K) @ y).view(B, H, T, y.shape[-1])


def causal_mask(Tq: int, Tk: int, sliding_window: int | None, device) -> torch.Tensor:
    """(Tq, Tk) True where query i (the last Tq of Tk tokens) may attend key j: j <= i, within the window if any."""
    distance = torch.arange(Tk - Tq, Tk, device=device)[:, None] - torch.arange(Tk, device=device)  # (Tq, Tk)
    return (distance >= 0) & (distance < sliding_window if sliding_window is not None else True)


def window_mask(position_ids: torch.Tensor, entries: int, sliding_window: int) -> torch.Tensor:
    """(B, 1, Tq, R) True where a query at position p still sees prompt entry j, at position j - R."""
    entry_positions = torch.arange(-entries, 0, device=position_ids.device)  # (R,)
    return (position_ids[:, None, :, None] - entry_positions) < sliding_window


def _check_arguments(module, kwargs: dict, sliding_window, softcap, position_ids) -> None:
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_KWARGS)
    if unknown:
        raise NotImplementedError(
            f"iclca's attention does not implement the argument(s) {', '.join(unknown)} of {type(module).__name__}")
    if hasattr(module, "memory_kv") and (sliding_window is not None or softcap is not None):
        raise NotImplementedError("Taylor memories cannot express a sliding window or soft-capped scores")
    if hasattr(module, "prefix_keys") and sliding_window is not None and position_ids is None:
        raise NotImplementedError("a sliding-window layer with a prompt prefix needs position_ids")


def patched_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, position_ids=None, **kwargs):
    """AttentionInterface function. query (B,H,Tq,D), key/value (B,Hkv,Tk,D) with Hkv dividing H, attention_mask
    boolean or additive (B,1,Tq,Tk) (sliding windows already in it), or None for plain causal attention; returns
    (out (B,Tq,H,D), None). Adds the prompt part of the module's patch buffers (module docstring). A module with an
    `_iclca_capture` callable hands it (key, value, query, the output) and how this layer attends (scaling, sliding_window,
    softcap): that is how prompts are captured. Arguments it does not
    implement are refused, never ignored."""
    _check_arguments(module, kwargs, sliding_window, softcap, position_ids)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    out = _attend(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, position_ids)
    if getattr(module, "_iclca_capture", None) is not None:
        module._iclca_capture(key.detach(), value.detach(), query.detach(), out.detach(), scaling=scaling,
                              sliding_window=sliding_window, softcap=softcap)
    return out, None


def _attend(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap,
            position_ids) -> torch.Tensor:
    """patched_attention's output (B, Tq, H, D)."""
    H, Tq, Tk = query.shape[1], query.shape[-2], key.shape[-2]
    mask = None if attention_mask is None else attention_mask[..., :Tk]  # (B, 1, Tq, Tk), True/0 = attend
    if mask is None and sliding_window is not None and Tk > sliding_window:  # a window that binds needs a mask
        mask = causal_mask(Tq, Tk, sliding_window, query.device)
    dropout = dropout if module.training else 0.0
    patched = hasattr(module, "prefix_keys") or hasattr(module, "memory_kv")
    if not patched and softcap is None:  # capture, or a plain model: sdpa, no (Tq, Tk) weights, no repeated heads
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None and Tq > 1,
            enable_gqa=key.shape[1] != H)  # (B, H, Tq, D)
        return out.transpose(1, 2).contiguous()
    dtype = query.dtype
    reduced = dtype in (torch.bfloat16, torch.float16)
    if reduced and hasattr(module, "prefix_keys") and not hasattr(module, "prefix_bias") and softcap is None:
        return _prefix_sdpa(module, query, key, value, mask, scaling, dropout, sliding_window, position_ids)
    if reduced:  # scores and softmax in float32, as sdpa's and flash kernels do
        query, key, value = query.float(), key.float(), value.float()
    key, value = _heads(key, H), _heads(value, H)  # (B, H, Tk, D)
    scores = soft_cap((query @ key.transpose(-1, -2)) * scaling, softcap)  # (B, H, Tq, Tk)
    if mask is None and Tq > 1:  # no padding: transformers leaves causality to us
        mask = causal_mask(Tq, Tk, None, scores.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:  # an additive float mask
        scores = scores + mask
    if hasattr(module, "prefix_keys"):
        pk = module.prefix_keys.to(query.dtype)  # (Hkv, R, D)
        pv = module.prefix_values.to(value.dtype)  # (Hkv, R, D)
        R = pk.shape[-2]
        prefix_scores = soft_cap(_grouped_matmul(query, pk.transpose(-1, -2)) * scaling, softcap)  # (B, H, Tq, R)
        if hasattr(module, "prefix_bias"):
            prefix_scores = prefix_scores + _heads(module.prefix_bias.to(query.dtype), H).unsqueeze(-2)  # + (H, 1, R)
        if sliding_window is not None:
            seen = window_mask(position_ids, R, sliding_window)  # (B, 1, Tq, R)
            prefix_scores = prefix_scores.masked_fill(~seen, torch.finfo(scores.dtype).min)
        weights = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1)  # (B, H, Tq, R + Tk)
        weights = nn.functional.dropout(weights, p=dropout)
        out = _grouped_matmul(weights[..., :R], pv) + weights[..., R:] @ value  # (B, H, Tq, D)
    elif hasattr(module, "memory_kv"):  # Taylor memories
        S = module.memory_kv.to(query.dtype)  # (Hkv, F, D)
        z = module.memory_k.to(query.dtype)  # (Hkv, F)
        phi_q = taylor_features(query, scaling, taylor_order_of(S.shape[-2], query.shape[-1]))  # (B, H, Tq, F)
        # (B, H, Tq, 1) for a stable exp; floored at 0 so that fully masked (padding) rows stay finite
        m = scores.amax(dim=-1, keepdim=True).clamp_min(0.0)
        e = nn.functional.dropout(torch.exp(scores - m), p=dropout)  # (B, H, Tq, Tk)
        scale = torch.exp(-m)  # the prompt part, on the same scale
        num = e @ value + _grouped_matmul(phi_q, S) * scale  # (B, H, Tq, D)
        den = e.sum(-1, keepdim=True) + _grouped_matmul(phi_q, z.unsqueeze(-1)) * scale  # (B, H, Tq, 1)
        out = num / den
    else:  # soft-capped scores and no patch (capture of a Gemma 2 prompt): eager attention
        out = nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout) @ value  # (B, H, Tq, D)
    return out.to(dtype).transpose(1, 2).contiguous()  # (B, Tq, H, D)


def _prefix_sdpa(module, query, key, value, mask, scaling, dropout, sliding_window, position_ids) -> torch.Tensor:
    """A prefix's keys and values are what a cache of the prompt holds: sdpa over [prefix; the query's own], as the
    stock model computes attention continuing from its cache (same kernel, same rounding in bfloat16, where the
    rounding of separate score and softmax steps would swap near-tied top tokens; float32 and float64 keep the
    explicit form, exact to their precision). -> (B, Tq, H, D)"""
    B, H, Tq, _ = query.shape
    Tk = key.shape[-2]
    pk = module.prefix_keys.to(key.dtype).expand(B, -1, -1, -1)  # (B, Hkv, R, D)
    pv = module.prefix_values.to(value.dtype).expand(B, -1, -1, -1)
    R = pk.shape[-2]
    if mask is None and Tq > 1:
        mask = causal_mask(Tq, Tk, None, query.device)  # (Tq, Tk)
    seen = (window_mask(position_ids, R, sliding_window) if sliding_window is not None
            else torch.ones(1, 1, Tq, R, dtype=torch.bool, device=query.device))  # (B or 1, 1, Tq, R)
    if mask is None and sliding_window is None:
        full = None
    else:
        own = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device) if mask is None else mask
        own = own.view(1, 1, Tq, Tk) if own.dim() == 2 else own  # (B or 1, 1, Tq, Tk)
        lead = torch.broadcast_shapes(own.shape[:2], seen.shape[:2])
        if own.dtype != torch.bool:  # an additive float mask
            seen = torch.zeros(seen.shape, dtype=own.dtype, device=own.device).masked_fill(~seen, torch.finfo(own.dtype).min)
        full = torch.cat([seen.expand(*lead, Tq, R), own.expand(*lead, Tq, Tk)], dim=-1)  # (B, 1, Tq, R + Tk)
    out = nn.functional.scaled_dot_product_attention(
        query, torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2), attn_mask=full, dropout_p=dropout,
        scale=scaling, enable_gqa=key.shape[1] != H)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous()


def patched_attention_reference(query, key, value, prompt_keys, prompt_values, scaling, prompt_bias=None, softcap=None,
                                sliding_window=None, taylor_order=0):
    """The definition, for tests: one softmax over [prompt entries; the query's own keys] per head. query, key,
    value (B, H, T, D): a query without a cache, at positions 0..T-1; prompt_keys/values (H, R, D) at positions
    -R..-1, prompt_bias (H, R). With taylor_order, exp on the prompt part becomes its Taylor polynomial."""
    T, R = query.shape[-2], prompt_keys.shape[-2]
    keys = torch.cat([prompt_keys.expand(query.shape[0], -1, -1, -1), key], dim=-2)  # (B, H, R + T, D)
    values = torch.cat([prompt_values.expand(query.shape[0], -1, -1, -1), value], dim=-2)
    x = soft_cap(query @ keys.transpose(-1, -2) * scaling, softcap)  # (B, H, T, R + T)
    if prompt_bias is not None:
        x = x + torch.cat([prompt_bias, prompt_bias.new_zeros(prompt_bias.shape[0], T)], dim=-1)[:, None, :]
    q_pos = torch.arange(T)[:, None]  # (T, 1)
    k_pos = torch.cat([torch.arange(-R, 0), torch.arange(T)])[None, :]  # (1, R + T)
    visible = (k_pos <= q_pos) & ((q_pos - k_pos < sliding_window) if sliding_window is not None else True)
    w = torch.exp(x - x.amax(-1, keepdim=True)) if not taylor_order else torch.exp(x)
    if taylor_order:
        w = torch.cat([taylor_kernel(x[..., :R], taylor_order), w[..., R:]], dim=-1)
    w = w * visible
    return (w / w.sum(-1, keepdim=True)) @ values  # (B, H, T, D)


AttentionInterface.register(ATTENTION_NAME, patched_attention)
# sdpa's masks: boolean, or None where causality alone is enough (no padding, no binding window), which lets capture
# and unpatched layers run sdpa's causal kernel instead of a materialised (P, P) mask
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
