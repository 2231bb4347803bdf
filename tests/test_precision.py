"""Reduced precision (bfloat16, float16): a patch stores each tensor as the model computes it, and its exactness is
stated against a yardstick measured in the same run, the prompted model in that dtype against itself in float32."""

import copy

import pytest
import torch

from helpers import (assert_one_line_error, convert, logits, make_decoder, one_json, random_ids, save_checkpoint)
from iclca_cli.patch import patched_copy
from test_contract import FAMILIES

P, Q = 40, 6
REDUCED = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("name", ["iclca_linear", "gpt2", "llama", "qwen2", "gemma2", "mamba2", "lfm2", "qwen3_next",
                                  "jamba", "rwkv"])
def test_the_default_patch_in_reduced_precision_is_within_twice_the_yardstick(name, dtype):
    case = FAMILIES[name]
    model32 = case.make(torch.float32)
    model = copy.deepcopy(model32).to(dtype)
    ids = [i + 3 for i in random_ids(P + Q, case.vocab - 3, 1)]
    prompted = logits(model, ids)[P:].float()  # (Q, V)
    yardstick = (prompted - logits(model32, ids)[P:].float()).abs().max()
    _, patch = convert(model, ids[:P])
    # each tensor as the model computes it: the model's dtype, and float32 where a family keeps a state in float32
    assert dtype in {t.dtype for t in patch.tensors.values()} <= {dtype, torch.float32} and patch.dtype == str(dtype)[6:]
    patched = logits(patched_copy(model, patch), ids[P:]).float()
    assert (patched - prompted).abs().max() <= 2 * yardstick, (float((patched - prompted).abs().max()), float(yardstick))
    assert (patched.argmax(-1) == prompted.argmax(-1)).float().mean() >= 0.99
    assert (logits(model, ids[P:]).float() - prompted).abs().max() > 10 * yardstick  # the prompt matters far more


def test_mamba2_keeps_its_ssm_state_in_float32_in_a_bfloat16_model():
    model = FAMILIES["mamba2"].make(torch.bfloat16)
    _, patch = convert(model, [i + 3 for i in random_ids(20, 58, 2)])
    assert {n.rsplit(".", 1)[1]: t.dtype for n, t in patch.tensors.items()} == \
        {"conv_state_0": torch.bfloat16, "recurrent_state_0": torch.float32}
    assert patch.dtype == "bfloat16"


@pytest.mark.parametrize("method,kw", [("compressed", {"budget": 8}), ("taylor", {"order": 2})])
def test_approximate_methods_fit_in_float32_and_store_the_models_dtype(method, kw):
    model = make_decoder("Llama", torch.bfloat16, 72)
    _, patch = convert(model, [i + 3 for i in random_ids(P, 94, 3)], method, **kw)
    assert {t.dtype for t in patch.tensors.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t.float()).all() for t in patch.tensors.values())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_checkpoint(make_decoder("Llama", torch.float32, 72), tmp_path_factory.mktemp("m") / "llama")


def test_cli_bfloat16_convert_eval_and_merge_report_against_the_yardstick(cli, tmp_path, llama_folder):
    prompt, queries = tmp_path / "prompt.txt", tmp_path / "q.jsonl"
    prompt.write_text("alpha: one\nbeta: two\ngamma: three\ndelta: four\n" * 3)
    queries.write_text('{"input": "beta:", "target": " two"}\n{"input": "gamma: three\\nalpha:"}\n')
    res = cli("convert", prompt, "-m", llama_folder, "-o", tmp_path / "p.st", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.stderr
    info = one_json(cli("inspect", tmp_path / "p.st", "--json"))
    assert info["iclca.dtype"] == "bfloat16" and {d for _, d in info["tensors"].values()} == {"bfloat16"}
    res = cli("eval", "-m", llama_folder, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries", queries,
              "--dtype", "bfloat16", "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    precision = report["precision"]
    assert precision["dtype"] == "bfloat16" and precision["prompted_vs_float32_max_abs_logit_diff"] > 0
    assert precision["max_abs_logit_diff_over_yardstick"] <= 2 and report["top1_agreement"] >= 0.99
    assert cli("merge", "-m", llama_folder, "-p", tmp_path / "p.st", "-o", tmp_path / "merged").exit_code == 0
    res = cli("eval", "-m", llama_folder, "--merged", tmp_path / "merged", "--prompt", prompt, "--queries", queries,
              "--dtype", "bfloat16", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["precision"]["max_abs_logit_diff_over_yardstick"] <= 2
    # a bfloat16 patch on the float32 model: the weights differ, and the error says which dtype to pass
    assert_one_line_error(cli("eval", "-m", llama_folder, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries",
                              queries), "was converted in bfloat16, this model runs in float32")


def test_dtype_auto_runs_in_the_checkpoints_own_dtype(cli, tmp_path):
    folder = save_checkpoint(make_decoder("Llama", torch.bfloat16, 72), tmp_path / "bf16")
    (tmp_path / "prompt.txt").write_text("alpha: one\n")
    res = cli("convert", tmp_path / "prompt.txt", "-m", folder, "-o", tmp_path / "p.st", "--dtype", "auto")
    assert res.exit_code == 0, res.stderr
    assert one_json(cli("inspect", tmp_path / "p.st", "--json"))["iclca.dtype"] == "bfloat16"


def test_top1_agreement_counts_an_exact_tie_at_the_top_either_way():
    from iclca_cli.evaluate import top1_agrees

    reference = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 2.0, 0.0]])  # a tie at the top, then none
    assert top1_agrees(reference, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])).tolist() == [True, False]
    assert top1_agrees(reference, reference).all()


def test_a_summary_in_bfloat16_takes_its_softmax_in_float32():
    """As sdpa's kernels do: bfloat16 scores and weights would round the summary's share of attention. The bfloat16
    result is the float32 computation on the same (bfloat16) numbers, rounded once at the end."""
    from torch import nn

    from iclca_cli.ops.softmax_attention import patched_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 16, generator=g).to(torch.bfloat16) * 3 for _ in range(3))  # (B, H, T, D)
    module = nn.Module().eval()
    module.register_buffer("prefix_keys", (torch.randn(4, 30, 16, generator=g) * 3).to(torch.bfloat16))  # (Hkv, R, D)
    module.register_buffer("prefix_values", torch.randn(4, 30, 16, generator=g).to(torch.bfloat16))
    module.register_buffer("prefix_bias", torch.rand(4, 30, generator=g).log().to(torch.bfloat16))  # (Hkv, R)
    out16, _ = patched_attention(module, q, k, v, None)
    module32 = nn.Module().eval()
    for name in ("prefix_keys", "prefix_values", "prefix_bias"):
        module32.register_buffer(name, getattr(module, name).float())
    out32, _ = patched_attention(module32, q.float(), k.float(), v.float(), None)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, out32.to(torch.bfloat16))


def test_a_prefix_in_bfloat16_computes_as_the_stock_model_continuing_from_its_cache():
    """A prefix is a cache: iclca's attention runs sdpa over [prefix; query] as the stock model does over its cache,
    so in bfloat16 the two round alike (the difference is far below the bfloat16 yardstick)."""
    model = make_decoder("Llama", torch.float32, 72)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = [i + 3 for i in random_ids(P + Q, 94, 6)]
    _, patch = convert(bf16, ids[:P])
    with torch.no_grad():
        cache = bf16(input_ids=torch.tensor([ids[:P]]), use_cache=True).cache
        continued = bf16(input_ids=torch.tensor([ids[P:]]), cache=cache).logits[0].float()
    patched = logits(patched_copy(bf16, patch), ids[P:]).float()
    yardstick = (logits(bf16, ids)[P:].float() - logits(model, ids)[P:]).abs().max()
    assert (patched - continued).abs().max() <= yardstick / 10
