"""Rotary / grouped-query decoders (a tiny random Llama): prefix patches equal the prompted model,
compressed patches with a budget >= P are the prefix, and their size does not grow with P."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from iclca_cli.convert import convert_prompt
from iclca_cli.decoder import kmeans_summary
from iclca_cli.errors import IclcaError
from iclca_cli.patch import apply_patch


def make_llama(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def patched(model, prompt, method="prefix", budget=0):
    patch = convert_prompt(model, prompt, "-", method, budget=budget)
    m = copy.deepcopy(model)
    apply_patch(m, patch)
    return m, patch


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("P,Q", [(1, 1), (17, 5), (100, 12)])
def test_prefix_patch_equals_prompted_llama(dtype, tol, P, Q):
    model = make_llama(dtype)
    g = torch.Generator().manual_seed(P)
    prompt, query = torch.randint(0, 97, (P,), generator=g), torch.randint(0, 97, (Q,), generator=g)
    full = model(input_ids=torch.cat([prompt, query])[None]).logits[0, P:]
    m, patch = patched(model, prompt.tolist())
    assert full.std() > 0.5  # logits with spread, so the bound means something
    assert (m(input_ids=query[None]).logits[0] - full).abs().max() <= tol
    assert tuple(patch.tensors["model.layers.0.self_attn.prefix_keys"].shape) == (2, P, 16)  # per key/value head


def test_prefix_patched_generation_equals_prompted():
    model = make_llama()
    prompt, query = list(range(3, 40)), torch.tensor([[5, 6, 7]])
    m, _ = patched(model, prompt)
    want = model.generate(torch.cat([torch.tensor([prompt]), query], 1), max_new_tokens=12, do_sample=False)
    got = m.generate(query, max_new_tokens=12, do_sample=False)
    assert want[0, len(prompt):].tolist() == got[0].tolist()


def test_compressed_with_budget_at_least_p_is_the_prefix():
    model = make_llama()
    prompt, query = list(range(1, 30)), torch.tensor([[4, 8, 15]])
    a, _ = patched(model, prompt)
    b, patch = patched(model, prompt, "compressed", budget=64)
    assert (a(input_ids=query).logits - b(input_ids=query).logits).abs().max() <= 1e-12
    assert patch.tensors["model.layers.1.self_attn.prefix_bias"].abs().max() == 0


def test_compressed_size_is_independent_of_p_and_closer_than_nothing():
    model = make_llama()
    g = torch.Generator().manual_seed(1)
    query = torch.randint(0, 97, (1, 6), generator=g)
    sizes = []
    for P in (40, 120):
        prompt = torch.randint(0, 97, (P,), generator=g)
        full = torch.log_softmax(model(input_ids=torch.cat([prompt[None], query], 1)).logits[0, P:], -1)
        m, patch = patched(model, prompt.tolist(), "compressed", budget=12)
        sizes.append(patch.nbytes)
        approx = torch.log_softmax(m(input_ids=query).logits[0], -1)
        base = torch.log_softmax(model(input_ids=query).logits[0], -1)
        kl = lambda x: (full.exp() * (full - x)).sum(-1).mean()  # noqa: E731
        assert kl(approx) < kl(base)
    assert sizes[0] == sizes[1]


def test_kmeans_summary_keeps_the_sink_and_counts():
    k, v = torch.randn(50, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    keys, values, bias = kmeans_summary(k, v, 6)
    assert keys.shape == (6, 8) and values.shape == (6, 8) and bias.shape == (6,)
    assert torch.equal(keys[0], k[0]) and bias[0] == 0
    assert torch.isclose(bias[1:].exp().sum(), torch.tensor(49.0, dtype=torch.float64))  # every other token in one cluster


def test_compressed_needs_a_budget():
    with pytest.raises(IclcaError, match="budget"):
        convert_prompt(make_llama(), [1, 2, 3], "-", "compressed", budget=0)


def test_cli_converts_and_evaluates_a_llama_folder_and_refuses_to_merge_it(cli, tmp_path):
    import json

    from conftest import save_checkpoint

    folder = save_checkpoint(make_llama(torch.float32), tmp_path / "llama")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\ngamma: three\ndelta: four\n" * 3)
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "beta:", "target": " two"}\n{"input": "delta:", "target": " four"}\n')
    for method, extra in (("prefix", []), ("compressed", ["--budget", "8"])):
        res = cli("convert", prompt, "-m", folder, "-o", tmp_path / f"{method}.st", "--method", method, *extra)
        assert res.exit_code == 0, res.stderr
        res = cli("eval", "-m", folder, "-p", tmp_path / f"{method}.st", "--prompt", prompt, "--queries", queries, "--json")
        assert res.exit_code == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["method"] == method
        if method == "prefix":
            assert report["max_abs_logit_diff"] <= 1e-4
    res = cli("merge", "-m", folder, "-p", tmp_path / "prefix.st", "-o", tmp_path / "merged")
    assert res.exit_code == 2 and "not supported yet" in res.stderr
    assert not (tmp_path / "merged").exists()
