"""Golden tests: the patched model on a query equals the model on prompt+query (ICLCA is exact)."""

import copy

import pytest
import torch

from helpers import logits, make_linear_model, convert, random_ids
from iclca_cli.errors import IclcaError
from iclca_cli.evaluate import greedy_continuation

# (seed, feature map, position type, prompt tokens, query tokens)
CASES = [
    (0, "elu+1", "learned", 1, 1),
    (1, "elu+1", "learned", 37, 64),
    (2, "elu+1", "learned", 512, 9),
    (3, "elu+1", "none", 200, 1),
    (4, "elu+1", "none", 512, 64),
    (5, "relu", "learned", 2, 17),
    (6, "relu", "learned", 300, 64),
    (7, "relu", "none", 1, 33),
    (8, "relu", "none", 450, 5),
]
IDS = [f"seed{s}-{fm}-{pos}-P{p}-Q{q}" for s, fm, pos, p, q in CASES]


@pytest.mark.parametrize("seed,feature_map,position_type,P,Q", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_patched_equals_prompted(seed, feature_map, position_type, P, Q, dtype, bound):
    model = make_linear_model(seed, dtype, feature_map, position_type)
    prompt, query = random_ids(P, seed=seed), random_ids(Q, seed=seed + 100)
    patched, patch = convert(model, prompt, chunk_size=128)  # chunked conversion for P > 128
    assert patch.position_offset == P and patch.prompt_tokens == P
    diff = (logits(patched, query) - logits(model, prompt + query)[P:]).abs().max().item()
    assert diff <= bound


def test_generate_on_patched_equals_generate_on_prompt_plus_query():
    model = make_linear_model(11)
    prompt, query = random_ids(40, seed=11), random_ids(6, seed=12)
    patched, _ = convert(model, prompt)
    out_patched = patched.generate(torch.tensor([query]), max_new_tokens=12, do_sample=False)[0, len(query):]
    out_prompted = model.generate(torch.tensor([prompt + query]), max_new_tokens=12, do_sample=False)[0, len(prompt + query):]
    assert out_patched.tolist() == out_prompted.tolist()
    assert greedy_continuation(patched, query, 12) == out_patched.tolist()


def test_position_offset_matters():
    """Without the offset, a learned-position model on the query differs by O(1) from the prompted model."""
    model = make_linear_model(12)
    prompt, query = random_ids(64, seed=12), random_ids(16, seed=13)
    patched, _ = convert(model, prompt)
    prompted = logits(model, prompt + query)[64:]
    assert (logits(patched, query) - prompted).abs().max() <= 1e-10
    patched.config.position_offset = 0
    assert (logits(patched, query) - prompted).abs().max() > 1e-2


@pytest.mark.parametrize("position_type", ["learned", "none"])
def test_stacking_equals_converting_the_concatenation(position_type):
    model = make_linear_model(13, position_embedding_type=position_type)
    a, b = random_ids(70, seed=13), random_ids(130, seed=14)
    _, patch_a = convert(model, a)
    _, stacked = convert(model, b, base_patch=patch_a)
    _, joint = convert(model, a + b)
    assert stacked.position_offset == joint.position_offset == 200
    assert stacked.prompt_tokens == joint.prompt_tokens == 200
    assert stacked.base_fingerprint == joint.base_fingerprint
    assert stacked.tensors.keys() == joint.tensors.keys()
    for name in joint.tensors:
        assert (stacked.tensors[name] - joint.tensors[name]).abs().max() <= 1e-10, name


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_conversion_equals_one_shot(chunk_size):
    model = make_linear_model(14, chunk_size=4096)  # the attention itself runs in parallel form
    prompt = random_ids(300, seed=14)
    _, one_shot = convert(model, prompt, chunk_size=len(prompt))
    _, chunked = convert(model, prompt, chunk_size=chunk_size)
    for name in one_shot.tensors:
        assert (chunked.tensors[name] - one_shot.tensors[name]).abs().max() <= 1e-10, name


def test_conversion_leaves_the_model_as_it_was():
    model = make_linear_model(15)
    before = copy.deepcopy(model.state_dict())
    convert(model, random_ids(10, seed=15))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_a_capture_that_fails_leaves_the_model_as_it_was():
    """Softmax capture switches the attention implementation and marks the attention modules; a forward that fails
    half-way (a token id outside the vocabulary) restores both."""
    from helpers import make_llama
    from iclca_cli.convert import convert_prompt

    model = make_llama()
    with pytest.raises(IndexError):
        convert_prompt(model, [10_000], "-", "prefix")
    assert model.config._attn_implementation != "iclca_patch"
    assert not any(hasattr(m, "_iclca_capture") for m in model.modules())


def test_prompt_longer_than_the_positions_is_refused():
    model = make_linear_model(17, max_position_embeddings=50)
    with pytest.raises(IclcaError, match="needs 51 positions but the model has 50"):
        convert(model, random_ids(50, seed=17))  # a prompt that fills every position leaves none for a query
    convert(model, random_ids(49, seed=17))
