"""The iclca_linear model and the transformers 5.x cache contract: its state lives in a DynamicCache(config=...)
whose linear-attention layers hold the memories S and z, passed as `cache=` (`past_key_values=` is an alias), with
positions from position_ids or the cache."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

from helpers import make_linear_model, random_ids
from iclca_cli.models import IclcaLinearCache


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_token_by_token_decoding_through_the_cache_matches_one_pass(name):
    model = make_linear_model(seed=5)
    ids = random_ids(40, seed=5)
    full = model(input_ids=torch.tensor([ids]), use_cache=False).logits  # (1, T, V)
    cache, steps = None, []
    for token in ids:
        res = model(input_ids=torch.tensor([[token]]), use_cache=True, **{name: cache})
        cache = res.cache
        steps.append(res.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)
    assert isinstance(cache, IclcaLinearCache) and isinstance(cache, DynamicCache)
    assert all(isinstance(layer, LinearAttentionLayer) for layer in cache.layers) and cache.get_seq_length() == 40
    S, z = cache.get_recurrent_state(1, 0), cache.get_recurrent_state(1, 1)
    assert S.shape == (1, 4, 8, 8) and z.shape == (1, 4, 8)


def test_the_cache_is_the_one_transformers_builds_from_the_config():
    model = make_linear_model(seed=6)
    assert model.config.layer_types == ["linear_attention"] * 2
    cache = DynamicCache(config=model.config)
    assert [type(layer) for layer in cache.layers] == [LinearAttentionLayer] * 2
    assert all(layer.number_of_states == 2 for layer in cache.layers)


def test_a_plain_dynamic_cache_works_with_explicit_positions_and_refuses_to_guess_them():
    model = make_linear_model(seed=7)
    ids = random_ids(12, seed=7)
    full = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    cache = DynamicCache(config=model.config)
    first = model(input_ids=torch.tensor([ids[:8]]), cache=cache, position_ids=torch.arange(8)[None])
    rest = model(input_ids=torch.tensor([ids[8:]]), cache=first.cache, position_ids=torch.arange(8, 12)[None])
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="cannot tell the next position"):
        model(input_ids=torch.tensor([ids[8:]]), cache=rest.cache)


def test_model_forms_agree_final_memories_included():
    """The whole model in parallel form (one chunk) and chunked form gives the same logits and memories."""
    ids = torch.tensor([random_ids(150, seed=3)])
    parallel = make_linear_model(seed=3, chunk_size=1000)
    chunked = make_linear_model(seed=3, chunk_size=16)
    a, b = parallel(input_ids=ids, use_cache=True), chunked(input_ids=ids, use_cache=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-10)
    for layer in range(2):
        for state in range(2):
            torch.testing.assert_close(a.cache.get_recurrent_state(layer, state),
                                       b.cache.get_recurrent_state(layer, state), rtol=0, atol=1e-10)


def test_padding_adds_nothing_to_memories():
    model = make_linear_model(seed=4, position_embedding_type="none")
    ids = random_ids(20, seed=4)
    plain = model(input_ids=torch.tensor([ids]), use_cache=True)
    padded = model(input_ids=torch.tensor([[0, 0, 0] + ids]), attention_mask=torch.tensor([[0, 0, 0] + [1] * 20]),
                   use_cache=True)
    torch.testing.assert_close(padded.logits[:, 3:], plain.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(padded.cache.get_recurrent_state(1, 0), plain.cache.get_recurrent_state(1, 0),
                               rtol=0, atol=1e-10)


def test_generate_keeps_the_state_from_the_second_step_on():
    """generate() hands the state back as `cache=` (transformers >= 5.24): 16 greedy tokens equal decoding by hand
    with full re-reads, so no step lost the state (with 5.24 and a forward that knew only past_key_values, tokens
    differed from the second on)."""
    model = make_linear_model(seed=8)
    ids = random_ids(10, seed=8)
    got = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, 10:].tolist()
    want, seq = [], list(ids)
    for _ in range(16):
        nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
        want.append(nxt)
        seq.append(nxt)
    assert got == want
