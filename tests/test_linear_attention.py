"""The parallel and chunked forms of causal linear attention against a per-token recurrent reference."""

import pytest
import torch

from conftest import make_linear_model, random_ids
from iclca_cli.models.modeling_iclca_linear import (
    FEATURE_MAPS,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_step,
)


def recurrent_reference(q, k, v, S, z, eps):
    """Token by token, the definition: o_i = q_i S_i / (q_i z_i + eps)."""
    outs = []
    for i in range(q.shape[-2]):
        S = S + k[..., i, :, None] * v[..., i, None, :]  # (B, H, F, Dv)
        z = z + k[..., i, :]  # (B, H, F)
        num = (q[..., i, :, None] * S).sum(-2)  # (B, H, Dv)
        den = (q[..., i, :] * z).sum(-1, keepdim=True) + eps  # (B, H, 1)
        outs.append(num / den)
    return torch.stack(outs, dim=-2), S, z


CASES = [(2, 64, 4, 16, 7), (1, 33, 2, 8, 5), (3, 1, 1, 4, 16), (2, 100, 2, 8, 100)]


@pytest.mark.parametrize("B,T,H,D,C", CASES, ids=[f"B{b}-T{t}-H{h}-D{d}-C{c}" for b, t, h, d, c in CASES])
@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_parallel_and_chunked_match_recurrent(B, T, H, D, C, feature_map, with_state):
    torch.manual_seed(T * 31 + D)
    phi = FEATURE_MAPS[feature_map]
    q, k = phi(torch.randn(B, H, T, D, dtype=torch.float64)), phi(torch.randn(B, H, T, D, dtype=torch.float64))
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    S0 = torch.rand(B, H, D, D, dtype=torch.float64) * with_state
    z0 = torch.rand(B, H, D, dtype=torch.float64) * with_state
    ref_out, ref_S, ref_z = recurrent_reference(q, k, v, S0, z0, 1e-6)
    for out, S, z in (linear_attention_parallel(q, k, v, S0, z0, 1e-6), linear_attention_chunked(q, k, v, S0, z0, 1e-6, C)):
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(S, ref_S, rtol=0, atol=1e-10)
        torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-10)
    # the one-token form decoding uses, applied token by token
    out, S, z = [], S0, z0
    for i in range(T):
        o, S, z = linear_attention_step(q[..., i : i + 1, :], k[..., i : i + 1, :], v[..., i : i + 1, :], S, z, 1e-6)
        out.append(o)  # (B, H, 1, Dv)
    torch.testing.assert_close(torch.cat(out, dim=-2), ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, ref_S, rtol=0, atol=1e-10)
    torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-10)


def test_token_by_token_decoding_matches_one_pass():
    """Incremental decoding (the one-token step, memories carried in the cache) gives the one-pass logits."""
    model = make_linear_model(seed=5)
    ids = random_ids(40, seed=5)
    full = model(input_ids=torch.tensor([ids]), use_cache=False).logits  # (1, T, V)
    cache, steps = None, []
    for token in ids:
        res = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        steps.append(res.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_model_forms_agree_final_memories_included():
    """The whole model in parallel form (one chunk) and chunked form gives the same logits and memories."""
    ids = torch.tensor([random_ids(150, seed=3)])
    parallel = make_linear_model(seed=3, chunk_size=1000)
    chunked = make_linear_model(seed=3, chunk_size=16)
    a, b = parallel(input_ids=ids, use_cache=True), chunked(input_ids=ids, use_cache=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-10)
    for i in a.past_key_values.states:
        for x, y in zip(a.past_key_values.states[i], b.past_key_values.states[i]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_padding_adds_nothing_to_memories():
    model = make_linear_model(seed=4, position_embedding_type="none")
    ids = random_ids(20, seed=4)
    plain = model(input_ids=torch.tensor([ids]), use_cache=True)
    padded = model(input_ids=torch.tensor([[0, 0, 0] + ids]), attention_mask=torch.tensor([[0, 0, 0] + [1] * 20]),
                   use_cache=True)
    torch.testing.assert_close(padded.logits[:, 3:], plain.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(padded.past_key_values.states[1][0], plain.past_key_values.states[1][0], rtol=0, atol=1e-10)
