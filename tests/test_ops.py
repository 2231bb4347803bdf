"""The ops layer against its naive references: every fast form of linear attention against the per-token
definition (final memories included), iclca's softmax attention with a folded-in prompt against one softmax over
the concatenation (prefix, score bias, grouped-query heads, sliding windows, soft caps, Taylor memories), and the
Taylor features against their polynomial."""

import pytest
import torch

from iclca_cli.ops.linear_attention import (
    FEATURE_MAPS,
    linear_attention,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
    linear_attention_step,
)
from iclca_cli.ops.softmax_attention import patched_attention, patched_attention_reference
from iclca_cli.ops.taylor import taylor_feature_dim, taylor_features

CASES = [(2, 64, 4, 16, 7), (1, 33, 2, 8, 5), (3, 1, 1, 4, 16), (2, 100, 2, 8, 100)]


@pytest.mark.parametrize("B,T,H,D,C", CASES, ids=[f"B{b}-T{t}-H{h}-D{d}-C{c}" for b, t, h, d, c in CASES])
@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_linear_attention_forms_match_the_recurrent_reference(B, T, H, D, C, feature_map, with_state):
    torch.manual_seed(T * 31 + D)
    phi = FEATURE_MAPS[feature_map]
    q, k = phi(torch.randn(B, H, T, D, dtype=torch.float64)), phi(torch.randn(B, H, T, D, dtype=torch.float64))
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    S0 = torch.rand(B, H, D, D, dtype=torch.float64) * with_state
    z0 = torch.rand(B, H, D, dtype=torch.float64) * with_state
    ref_out, ref_S, ref_z = linear_attention_recurrent(q, k, v, S0, z0, 1e-6)
    forms = [linear_attention_parallel(q, k, v, S0, z0, 1e-6), linear_attention_chunked(q, k, v, S0, z0, 1e-6, C),
             linear_attention(q, k, v, S0, z0, 1e-6, C)]
    out, S, z = [], S0, z0  # the one-token form decoding uses, applied token by token
    for i in range(T):
        o, S, z = linear_attention_step(q[..., i : i + 1, :], k[..., i : i + 1, :], v[..., i : i + 1, :], S, z, 1e-6)
        out.append(o)  # (B, H, 1, Dv)
    forms.append((torch.cat(out, dim=-2), S, z))
    for out, S, z in forms:
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(S, ref_S, rtol=0, atol=1e-10)
        torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-10)


def test_taylor_features_are_the_taylor_polynomial():
    torch.manual_seed(0)
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    s = 0.25
    x = s * (q * k).sum(-1)
    for order, poly in ((1, 1 + x), (2, 1 + x + x**2 / 2)):
        fq, fk = taylor_features(q, s, order), taylor_features(k, s, order)
        assert fq.shape[-1] == taylor_feature_dim(16, order)
        torch.testing.assert_close((fq * fk).sum(-1), poly, rtol=0, atol=1e-12)


class Attention(torch.nn.Module):
    """What patched_attention needs of an attention module: training flag and patch buffers."""


SOFTMAX_CASES = [  # (batch, query heads, kv heads, query tokens, prompt entries, with bias, softcap, window)
    (1, 4, 4, 5, 9, False, None, None),
    (2, 4, 2, 7, 12, True, None, None),
    (1, 6, 2, 1, 3, False, 2.5, None),
    (2, 4, 1, 9, 6, True, 4.0, 5),
    (1, 4, 2, 12, 7, False, None, 8),
]


@pytest.mark.parametrize("B,H,Hkv,T,R,bias,softcap,window", SOFTMAX_CASES,
                         ids=[f"B{c[0]}-H{c[1]}-Hkv{c[2]}-T{c[3]}-R{c[4]}-bias{int(c[5])}-cap{c[6]}-win{c[7]}"
                              for c in SOFTMAX_CASES])
def test_patched_softmax_attention_matches_its_reference(B, H, Hkv, T, R, bias, softcap, window):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + R)
    D, s = 8, 8**-0.5
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g)  # noqa: E731
    q, k, v = randn(B, H, T, D) * 2, randn(B, Hkv, T, D) * 2, randn(B, Hkv, T, D)
    pk, pv = randn(Hkv, R, D) * 2, randn(Hkv, R, D)
    pb = randn(Hkv, R) if bias else None
    module = Attention().eval()
    module.register_buffer("prefix_keys", pk)
    module.register_buffer("prefix_values", pv)
    if bias:
        module.register_buffer("prefix_bias", pb)
    positions = torch.arange(T).expand(B, T)
    got, _ = patched_attention(module, q, k, v, None, scaling=s, softcap=softcap, sliding_window=window,
                               position_ids=positions)  # (B, T, H, D)
    G = H // Hkv
    want = patched_attention_reference(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                       pk.repeat_interleave(G, 0), pv.repeat_interleave(G, 0), s,
                                       pb.repeat_interleave(G, 0) if bias else None, softcap, window)
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_memories_match_the_reference_polynomial_attention(order):
    """Memories S = sum phi(k) v^T, z = sum phi(k) of prompt keys give exactly attention with the Taylor polynomial
    in place of exp on the prompt part."""
    g = torch.Generator().manual_seed(order)
    B, H, Hkv, T, P, D, s = 2, 4, 2, 6, 11, 8, 8**-0.5
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g) * 0.5  # noqa: E731
    q, k, v, pk, pv = randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D), randn(Hkv, P, D), randn(Hkv, P, D)
    phi = taylor_features(pk, s, order)  # (Hkv, P, F)
    module = Attention().eval()
    module.register_buffer("memory_kv", phi.transpose(-1, -2) @ pv)  # (Hkv, F, D)
    module.register_buffer("memory_k", phi.sum(-2))  # (Hkv, F)
    got, _ = patched_attention(module, q, k, v, None, scaling=s)
    G = H // Hkv
    want = patched_attention_reference(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), pk.repeat_interleave(G, 0),
                                       pv.repeat_interleave(G, 0), s, taylor_order=order)
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-12)


def test_unpatched_attention_is_plain_causal_attention():
    """Without a patch (capture, plain models): sdpa, or eager where scores are soft-capped."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 7, 8, dtype=torch.float64, generator=g) for _ in range(3))
    empty = torch.zeros(4, 0, 8, dtype=torch.float64)
    for softcap in (None, 3.0):
        got, _ = patched_attention(Attention().eval(), q, k, v, None, scaling=0.3, softcap=softcap)
        want = patched_attention_reference(q, k, v, empty, empty, 0.3, softcap=softcap)
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-12)
