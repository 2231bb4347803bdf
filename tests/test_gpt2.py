"""GPT-2 (softmax): exact prefix patches, constant-size Taylor patches, merge, generate, CLI."""

import copy
import json

import pytest
import torch

from helpers import EXAMPLE_PROMPT, EXAMPLE_QUERIES, convert, logits, make_gpt2_model, random_ids, tree_digest
from iclca_cli.errors import IclcaError
from iclca_cli.loading import load_model
from iclca_cli.merge import merge_patch

V = 50257


def patched(model, prompt, method="prefix", order=2):
    return convert(model, prompt, method, **({"order": order} if method == "taylor" else {}))


def test_real_gpt2_tokenizer_offline(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world").input_ids == [15496, 995]
    assert len(gpt2_tokenizer) == 50257 and gpt2_tokenizer.eos_token_id == 50256


CASES = [(0, 1, 1), (1, 17, 40), (2, 200, 8), (3, 90, 1)]


@pytest.mark.parametrize("seed,P,Q", CASES, ids=[f"seed{s}-P{p}-Q{q}" for s, p, q in CASES])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_prefix_patch_equals_prompted(seed, P, Q, dtype, bound):
    model = make_gpt2_model(seed, dtype, scale_attn_by_inverse_layer_idx=seed % 2 == 1)
    prompt, query = random_ids(P, V, seed), random_ids(Q, V, seed + 1)
    m, patch = patched(model, prompt)
    assert patch.tensors["transformer.h.0.attn.prefix_keys"].shape == (4, P, 8)
    assert (logits(m, query) - logits(model, prompt + query)[P:]).abs().max().item() <= bound


@pytest.mark.parametrize("method", ["prefix", "taylor"])
def test_left_padded_batch_equals_single_sequences(method):
    """The mask function registered with AttentionMaskInterface brings padding masks to the patched attention."""
    model = make_gpt2_model(6)
    m, _ = patched(model, random_ids(30, V, 6), method)
    a, b = random_ids(7, V, 7), random_ids(4, V, 8)
    batch = torch.tensor([a, [0, 0, 0] + b])
    mask = torch.tensor([[1] * 7, [0, 0, 0] + [1] * 4])
    out = m(input_ids=batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert (out[0] - logits(m, a)).abs().max() <= 1e-10
    assert (out[1, 3:] - logits(m, b)).abs().max() <= 1e-10


def test_taylor_converges_where_scores_are_small():
    """With small q.k the Taylor patch approaches the prompted model, order 2 closer than order 1."""
    model = make_gpt2_model(9, initializer_range=0.02)
    prompt, query = random_ids(50, V, 9), random_ids(6, V, 10)
    want = logits(model, prompt + query)[50:]
    err = {o: (logits(patched(model, prompt, "taylor", o)[0], query) - want).abs().max().item() for o in (1, 2)}
    base = (logits(model, query) - want).abs().max().item()
    assert err[2] < err[1] < base


def test_taylor_patch_size_does_not_depend_on_prompt_length():
    model = make_gpt2_model(11)
    sizes = {order: {P: patched(model, random_ids(P, V, P), "taylor", order)[1].nbytes for P in (5, 50, 200)}
             for order in (1, 2)}
    for order, by_p in sizes.items():
        assert len(set(by_p.values())) == 1, by_p
    assert sizes[1][5] == 2 * 4 * 9 * (8 + 1) * 8  # layers x heads x F (1 + D) x (Dv + 1) x float64
    assert sizes[2][5] == 2 * 4 * 45 * (8 + 1) * 8  # F = 1 + D + D(D+1)/2
    prefix = [patched(model, random_ids(P, V, P))[1].nbytes for P in (5, 50)]
    assert prefix[1] == 10 * prefix[0]


def test_methods_that_do_not_fit_the_family_are_refused():
    with pytest.raises(IclcaError, match="does not apply to 'gpt2'"):
        patched(make_gpt2_model(12), [1, 2, 3], "exact")


def test_prompt_that_leaves_no_position_for_a_query_is_refused():
    model = make_gpt2_model(13, n_positions=32)
    with pytest.raises(IclcaError, match="needs 33 positions but the model has 32"):
        patched(model, random_ids(32, V, 13))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, gpt2_tokenizer):
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    make_gpt2_model(20, torch.float32).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def test_a_merged_gpt2_carries_its_shifted_position_table(tmp_path, gpt2_folder):
    """GPT-2's learned positions: the merged checkpoint's table is the base table from row P on, and its config
    says so (n_positions = 256 - P); merged == patched is the contract test's."""
    base, tok = load_model(str(gpt2_folder), "float64")
    m, patch = patched(base, random_ids(40, V, 21))
    folder = merge_patch(base, tok, patch, tmp_path / "merged")
    merged, _ = load_model(str(folder), "float64")
    assert type(merged).__name__ == "IclcaGPT2LMHeadModel" and merged.config.n_positions == 256 - 40
    assert torch.equal(merged.transformer.wpe.weight, base.transformer.wpe.weight[40:])
    assert base.transformer.wpe.num_embeddings == 256  # the base model is left as it was


def test_cli_on_gpt2_every_method(cli, tmp_path, gpt2_folder):
    before = tree_digest(gpt2_folder)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(EXAMPLE_PROMPT.read_text())
    reports = {}
    for method, order in (("prefix", 2), ("taylor", 1), ("taylor", 2)):
        patch = tmp_path / f"{method}{order}.safetensors"
        order_flag = ("--order", order) if method == "taylor" else ()
        res = cli("convert", prompt, "-m", gpt2_folder, "-o", patch, "--method", method, *order_flag,
                  "--dtype", "float64", "--json")
        assert res.exit_code == 0, res.stderr
        res = cli("eval", "-m", gpt2_folder, "-p", patch, "--prompt", prompt, "--queries", EXAMPLE_QUERIES,
                  "--dtype", "float64", "--json")
        assert res.exit_code == 0, res.stderr
        reports[f"{method}{order}"] = json.loads(res.stdout)
        merged = tmp_path / f"merged-{method}{order}"
        assert cli("merge", "-m", gpt2_folder, "-p", patch, "-o", merged).exit_code == 0
        res = cli("eval", "-m", gpt2_folder, "--merged", merged, "--prompt", prompt, "--queries", EXAMPLE_QUERIES,
                  "--dtype", "float64", "--json")
        assert res.exit_code == 0, res.stderr
        assert abs(json.loads(res.stdout)["kl_prompted_patched"] - reports[f"{method}{order}"]["kl_prompted_patched"]) < 1e-6
    assert reports["prefix2"]["max_abs_logit_diff"] <= 1e-9 and reports["prefix2"]["kl_prompted_patched"] <= 1e-12
    assert reports["prefix2"]["accuracy"]["patched"] == reports["prefix2"]["accuracy"]["prompted"]
    for name in ("taylor1", "taylor2"):  # approximate: reported as measured, only sanity is checked
        assert reports[name]["kl_prompted_patched"] >= 0 and reports[name]["kl_prompted_base"] > 0
    assert tree_digest(gpt2_folder) == before


def test_cli_gpt2_prompt_plus_query_too_long(cli, tmp_path, gpt2_folder):
    prompt = tmp_path / "long.txt"
    prompt.write_text("apple: 7\n" * 64)  # 256 tokens: every position of the tiny model
    res = cli("convert", prompt, "-m", gpt2_folder, "-o", tmp_path / "p.st")
    assert res.exit_code == 2 and "needs 257 positions but the model has 256" in res.stderr


def test_prefix_patch_as_a_peft_adapter_reproduces_prompted_logits(cli, tmp_path, gpt2_folder):
    from peft import PeftModel

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(EXAMPLE_PROMPT.read_text())
    patch = tmp_path / "prefix.safetensors"
    assert cli("convert", prompt_file, "-m", gpt2_folder, "-o", patch, "--method", "prefix", "--dtype", "float64").exit_code == 0
    res = cli("export-peft", "-m", gpt2_folder, "-p", patch, "-o", tmp_path / "adapter", "--json")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "adapter/adapter_config.json").is_file() and (tmp_path / "adapter/adapter_model.safetensors").is_file()
    base, tok = load_model(str(gpt2_folder), "float64")
    prompt = tok(prompt_file.read_text()).input_ids
    query = tok("river:", add_special_tokens=False).input_ids
    want = logits(base, prompt + query)[len(prompt):]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([query])).logits[0]
    # PEFT stores prompt embeddings in float32 whatever the model's dtype: the float32 bound applies.
    assert (got - want).abs().max().item() <= 1e-4
    res = cli("export-peft", "-m", gpt2_folder, "-p", patch, "-o", tmp_path / "adapter")
    assert res.exit_code == 2 and "already exists" in res.stderr


@pytest.mark.xfail(strict=True, reason="upstream: PEFT 0.21.2's prepare_inputs_for_generation looks for the prefix "
                   "under past_key_values, which transformers 5.24's generate() passes as cache, so it injects the "
                   "prefix again at every step; strict, so a fixed PEFT turns this into a failure to notice")
def test_generate_through_a_peft_prefix_adapter_equals_prompted(cli, tmp_path, gpt2_folder):
    from peft import PeftModel

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(EXAMPLE_PROMPT.read_text())
    patch = tmp_path / "prefix.safetensors"
    assert cli("convert", prompt_file, "-m", gpt2_folder, "-o", patch, "--method", "prefix", "--dtype", "float64").exit_code == 0
    assert cli("export-peft", "-m", gpt2_folder, "-p", patch, "-o", tmp_path / "adapter").exit_code == 0
    base, tok = load_model(str(gpt2_folder), "float64")
    prompt = tok(prompt_file.read_text()).input_ids
    query = tok("river:", add_special_tokens=False).input_ids
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    got = peft_model.generate(input_ids=torch.tensor([query]), max_new_tokens=6, do_sample=False)[0, -6:].tolist()
    assert got == base.generate(torch.tensor([prompt + query]), max_new_tokens=6, do_sample=False)[0, -6:].tolist()
