"""Causal linear attention with initial memories (ICLCA's bias terms): the naive per-token reference and the
parallel, chunked and one-token forms that models run.

Per head, with feature-mapped q, k:  o_i = q_i^T S_i / (q_i^T z_i + eps),  S_i = S_0 + sum_{j<=i} k_j v_j^T,
z_i = z_0 + sum_{j<=i} k_j.  Shapes: q, k (B, H, T, F); v (B, H, T, Dv); memories S (B, H, F, Dv), z (B, H, F).
Every form returns (out (B, H, T, Dv), S_T, z_T): the memories after the last token are the state a cache keeps
and a patch stores.

Travels into merged folders inside the self-contained modeling_iclca_linear.py (torch only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


def linear_attention_recurrent(q, k, v, S0, z0, eps):
    """The definition, token by token: the naive reference every other form is tested against."""
    S, z, outs = S0, z0, []
    for i in range(q.shape[-2]):
        S = S + k[..., i, :, None] * v[..., i, None, :]  # (B, H, F, Dv)
        z = z + k[..., i, :]  # (B, H, F)
        num = (q[..., i, :, None] * S).sum(-2)  # (B, H, Dv)
        den = (q[..., i, :] * z).sum(-1, keepdim=True) + eps  # (B, H, 1)
        outs.append(num / den)
    return torch.stack(outs, dim=-2), S, z  # (B, H, T, Dv)


def linear_attention_parallel(q, k, v, S0, z0, eps):
    """A whole block at once: O(T^2) scores, few ops."""
    A = torch.tril(q @ k.transpose(-1, -2))  # (B, H, T, T) causal scores phi(q_i).phi(k_j)
    num = A @ v + q @ S0  # (B, H, T, Dv)
    den = A.sum(-1) + (q @ z0.unsqueeze(-1)).squeeze(-1) + eps  # (B, H, T)
    out = num / den.unsqueeze(-1)  # (B, H, T, Dv)
    S = S0 + k.transpose(-1, -2) @ v  # (B, H, F, Dv)
    z = z0 + k.sum(-2)  # (B, H, F)
    return out, S, z


def linear_attention_step(q, k, v, S0, z0, eps):
    """One token (T = 1), the recurrent form decoding uses: fewer ops than the parallel form, which matters when
    each op is a few microseconds."""
    S = torch.baddbmm(S0.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2), v.flatten(0, 1)).view(S0.shape)
    z = z0 + k.squeeze(-2)  # (B, H, F)
    num = q @ S  # (B, H, 1, Dv)
    den = q @ z.unsqueeze(-1) + eps  # (B, H, 1, 1)
    return num / den, S, z


def linear_attention_chunked(q, k, v, S0, z0, eps, chunk_size):
    """The parallel form chunk by chunk, carrying (S, z): memory O(chunk_size^2), not O(T^2)."""
    S, z, outs = S0, z0, []
    for start in range(0, q.shape[-2], chunk_size):
        sl = slice(start, start + chunk_size)
        out, S, z = linear_attention_parallel(q[..., sl, :], k[..., sl, :], v[..., sl, :], S, z, eps)
        outs.append(out)  # (B, H, C, Dv)
    return torch.cat(outs, dim=-2), S, z  # (B, H, T, Dv)


def linear_attention(q, k, v, S0, z0, eps, chunk_size):
    """The form that suits T: one-token step, one parallel block, or chunks."""
    T = q.shape[-2]
    if T == 1:
        return linear_attention_step(q, k, v, S0, z0, eps)
    if T > chunk_size:
        return linear_attention_chunked(q, k, v, S0, z0, eps, chunk_size)
    return linear_attention_parallel(q, k, v, S0, z0, eps)
