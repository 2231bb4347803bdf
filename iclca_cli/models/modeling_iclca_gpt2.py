"""GPT-2 with a prompt folded in: the prompt's keys/values (`prefix`, exact) or Taylor memories
(`taylor`, constant size, approximate), added to softmax attention through transformers'
AttentionInterface, without editing transformers.

For a query q the prompt part of softmax attention is
    N(q) = sum_j exp(s q.k_j) v_j ,   D(q) = sum_j exp(s q.k_j)        (s: the attention scaling)
and the attention output is (N(q) + sum_{query j} ...) / (D(q) + sum_{query j} ...).
- prefix: N and D come from the stored prompt keys/values [H, P, D] (exact).
- taylor: exp(s q.k) ~ phi(q).phi(k), phi the Taylor features of order 1 or 2 (1 + x + x^2/2 with
  x = s q.k), so N ~ phi(q)^T S and D ~ phi(q)^T z with S = sum phi(k) v^T [H, F, D], z = sum phi(k) [H, F].
  Good only where |s q.k| is small (order 1 can even give negative weights); see the README.

Query tokens must sit at positions P, P+1, ...: a patched model's position table is shifted by P
rows (row i holds the embedding of position P + i), so positions need no other handling.

Self-contained (torch + transformers only): `iclca merge` copies it into a checkpoint folder.
"""

from __future__ import annotations

import functools

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "iclca_patch"


def taylor_feature_dim(head_dim: int, order: int) -> int:
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


def patched_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query (B,H,Tq,D), key/value (B,Hkv,Tk,D) with Hkv dividing H
    (grouped-query attention), attention_mask boolean or additive (B,1,Tq,Tk), or None for plain causal
    attention (upper-left aligned, as sdpa's is_causal); returns (out (B,Tq,H,D), None).
    Adds the patch buffers' prompt part: prefix_keys/prefix_values (Hkv,R,D) with an optional score
    bias prefix_bias (Hkv,R), or Taylor memories. A module with an `_iclca_capture` callable hands it
    (key, value, query): that is how prompts are captured from any model using this interface."""
    if getattr(module, "_iclca_capture", None) is not None:
        module._iclca_capture(key.detach(), value.detach(), query.detach())
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    H = query.shape[1]
    Tq, Tk = query.shape[-2], key.shape[-2]
    mask = None if attention_mask is None else attention_mask[..., :Tk]  # (B, 1, Tq, Tk), True/0 = attend
    if not hasattr(module, "prefix_keys") and not hasattr(module, "memory_kv"):  # no patch: capture, or a plain model
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
            is_causal=mask is None and Tq > 1, enable_gqa=key.shape[1] != H,
        )  # (B, H, Tq, D), without materialising the (Tq, Tk) weights or repeating key/value heads
        return out.transpose(1, 2).contiguous(), None
    key, value = _heads(key, H), _heads(value, H)  # (B, H, Tk, D)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if mask is None and Tq > 1:  # no padding: transformers leaves causality to us (as sdpa's is_causal)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=scores.device).tril()  # (Tq, Tk)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:  # an additive float mask
        scores = scores + mask
    if hasattr(module, "prefix_keys"):
        pk = module.prefix_keys.to(query.dtype)  # (Hkv, P, D)
        pv = module.prefix_values.to(value.dtype)  # (Hkv, P, D)
        P = pk.shape[-2]
        prefix_scores = _grouped_matmul(query, pk.transpose(-1, -2)) * scaling  # (B, H, Tq, P)
        if hasattr(module, "prefix_bias"):
            prefix_scores = prefix_scores + _heads(module.prefix_bias.to(query.dtype), H).unsqueeze(-2)  # + (H, 1, P)
        weights = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1)  # (B, H, Tq, P + Tk)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        out = _grouped_matmul(weights[..., :P], pv) + weights[..., P:] @ value  # (B, H, Tq, D)
    else:  # Taylor memories
        S = module.memory_kv.to(query.dtype)  # (Hkv, F, D)
        z = module.memory_k.to(query.dtype)  # (Hkv, F)
        phi_q = taylor_features(query, scaling, taylor_order_of(S.shape[-2], query.shape[-1]))  # (B, H, Tq, F)
        # (B, H, Tq, 1) for a stable exp; floored at 0 so that fully masked (padding) rows stay finite
        m = scores.amax(dim=-1, keepdim=True).clamp_min(0.0)
        e = torch.exp(scores - m)  # (B, H, Tq, Tk)
        e = nn.functional.dropout(e, p=dropout, training=module.training)
        scale = torch.exp(-m)  # the prompt part, on the same scale
        num = e @ value + _grouped_matmul(phi_q, S) * scale  # (B, H, Tq, D)
        den = e.sum(-1, keepdim=True) + _grouped_matmul(phi_q, z.unsqueeze(-1)) * scale  # (B, H, Tq, 1)
        out = num / den
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


AttentionInterface.register(ATTENTION_NAME, patched_attention)
# sdpa's masks: boolean, or None where causality alone is enough (no padding), which lets capture and
# unpatched layers run sdpa's causal kernel instead of a materialised (P, P) mask
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> GPT-2 self-attention module, e.g. 'transformer.h.0.attn'."""
    return {f"transformer.h.{i}.attn": block.attn for i, block in enumerate(model.transformer.h)}


@torch.no_grad()
def register_patch_buffers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put patch tensors ('<module path>.<buffer>') on their modules as buffers, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    for name, t in tensors.items():
        path, buffer = name.rsplit(".", 1)
        model.get_submodule(path).register_buffer(buffer, t.to(dtype).clone())


def empty_patch_buffers(attn: nn.Module, method: str, heads: int, entries: int, feature_dim: int, head_dim: int) -> None:
    """Zero buffers of a merged model's attention module, for its checkpoint to fill: prefix/compressed
    entries (heads, R, D) (+ score bias (heads, R)), or Taylor memories (heads, F, D), (heads, F)."""
    if method == "taylor":
        attn.register_buffer("memory_kv", torch.zeros(heads, feature_dim, head_dim))
        attn.register_buffer("memory_k", torch.zeros(heads, feature_dim))
        return
    attn.register_buffer("prefix_keys", torch.zeros(heads, entries, head_dim))
    attn.register_buffer("prefix_values", torch.zeros(heads, entries, head_dim))
    if method == "compressed":
        attn.register_buffer("prefix_bias", torch.zeros(heads, entries))


@torch.no_grad()
def attach_patch(model: GPT2LMHeadModel, tensors: dict[str, torch.Tensor], prompt_tokens: int) -> None:
    """Put the patch tensors on the attention modules as buffers, shift the position table by
    prompt_tokens rows and switch attention to `patched_attention`."""
    register_patch_buffers(model, tensors)
    wpe = model.transformer.wpe
    n, d = wpe.weight.shape
    shifted = nn.Embedding(n - prompt_tokens, d, device=wpe.weight.device, dtype=wpe.weight.dtype)
    shifted.weight.copy_(wpe.weight[prompt_tokens:])  # row i = position prompt_tokens + i
    model.transformer.wpe = shifted
    model.config.n_positions = n - prompt_tokens
    model.set_attn_implementation(ATTENTION_NAME)


@strict
class IclcaGPT2Config(GPT2Config):
    """A GPT-2 config whose model carries a folded-in prompt (its position table already shifted)."""

    model_type = "iclca_gpt2"

    iclca_method: str = "prefix"  # "prefix", "compressed" or "taylor"
    iclca_prompt_tokens: int = 0  # P: the position shift (and the prefix length)
    iclca_feature_dim: int = 0  # F of the Taylor memories (taylor only)
    iclca_entries: int = 0  # R of a compressed patch (0: P)


class IclcaGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = IclcaGPT2Config

    def __init__(self, config: IclcaGPT2Config):
        super().__init__(config)
        H = config.num_attention_heads
        R = config.iclca_entries or config.iclca_prompt_tokens
        for attn in attention_layers(self).values():
            empty_patch_buffers(attn, config.iclca_method, H, R, config.iclca_feature_dim, config.hidden_size // H)
        self.config._attn_implementation = ATTENTION_NAME


__all__ = ["IclcaGPT2Config", "IclcaGPT2LMHeadModel", "patched_attention", "attach_patch", "taylor_features"]
