"""State-space, linear-attention and hybrid families of transformers beyond the contract (test_contract.py):
stacking, chunked conversion, batches, each state's own dtype, the command line, and refusals."""

import pytest
import torch
import transformers

from helpers import (assert_one_line_error, convert, logits, make_recurrent, one_json, random_ids, save_checkpoint)
from iclca_cli.errors import IclcaError

HYBRIDS = ["lfm2", "falcon_h1", "granitemoehybrid", "zamba2"]
FLOAT64_THROUGHOUT = {"lfm2"}  # the others keep Mamba2-style SSM states (and their arithmetic) in float32


def ids(n, seed):
    return [i + 3 for i in random_ids(n, 58, seed)]  # above the special tokens 0-2


def assert_same_states(got: dict, want: dict, name: str) -> None:
    """Equal to float64 precision where the family computes in float64 throughout; else to float32's (relative to
    each tensor's scale: float32 SSM states perturb every later layer's states by as much)."""
    assert got.keys() == want.keys()
    for n, t in want.items():
        bound = 1e-10 if name in FLOAT64_THROUGHOUT else 1e-6 * float(t.abs().max())
        assert (got[n] - t).abs().max() <= bound, (n, t.dtype)


@pytest.mark.parametrize("name", HYBRIDS)
def test_stacking_equals_converting_the_concatenation(name):
    model = make_recurrent(name, seed=1)
    a, b = ids(17, 1), ids(23, 2)
    _, patch_a = convert(model, a)
    _, stacked = convert(model, b, base_patch=patch_a)
    _, joint = convert(model, a + b)
    assert stacked.prompt_tokens == stacked.position_offset == 40 == joint.position_offset
    assert_same_states(stacked.tensors, joint.tensors, name)


@pytest.mark.parametrize("name", HYBRIDS)
def test_conversion_in_chunks_equals_one_pass(name):
    model = make_recurrent(name, seed=2)
    prompt = ids(40, 3)
    _, one = convert(model, prompt, chunk_size=512)
    _, chunked = convert(model, prompt, chunk_size=7)
    assert_same_states(chunked.tensors, one.tensors, name)


def test_every_sequence_of_a_batch_starts_from_the_prompt():
    model = make_recurrent("lfm2", seed=3)
    prompt, q1, q2 = ids(25, 4), ids(6, 5), ids(6, 6)
    patched, _ = convert(model, prompt)
    with torch.no_grad():
        batch = patched(input_ids=torch.tensor([q1, q2])).logits
    for row, q in zip(batch, (q1, q2)):
        assert (row - logits(model, prompt + q)[25:]).abs().max() <= 1e-10


def test_each_state_keeps_its_dtype():
    """Mamba2 keeps its SSM state in float32 inside a float64 (or bfloat16) model: so does the patch."""
    model = make_recurrent("mamba2", seed=4)
    _, patch = convert(model, ids(20, 7))
    dtypes = {n.rsplit(".", 1)[1]: t.dtype for n, t in patch.tensors.items()}
    assert dtypes == {"conv_state_0": torch.float64, "recurrent_state_0": torch.float32}
    assert patch.dtype == "float64"


def test_a_method_that_does_not_apply_is_refused():
    with pytest.raises(IclcaError, match="method 'prefix' does not apply to 'mamba2' models"):
        convert(make_recurrent("mamba2"), ids(5, 8), "prefix")


def test_cli_converts_inspects_evaluates_and_merges_a_hybrid(cli, tmp_path):
    folder = save_checkpoint(make_recurrent("lfm2", torch.float32, seed=5), tmp_path / "lfm2")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\ngamma: three\n")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "beta:", "target": " two"}\n{"input": "gamma:", "target": " three"}\n')
    res = cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st", "--dtype", "float64", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["method"] == "exact"
    info = one_json(cli("inspect", tmp_path / "p.st", "--json"))
    parts = info["patch_bytes_by_part"]
    assert parts["recurrent"] > 0 and parts["attention"] > 0 and sum(parts.values()) == info["patch_bytes"]
    assert info["iclca.layer_kinds"] == "conv,conv,full_attention,conv,conv,full_attention"  # LFM2-350M's order
    assert info["iclca.transformers_version"] == transformers.__version__
    res = cli("eval", "-m", folder, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries", queries, "--dtype",
              "float64", "--max-abs-logit-diff", "1e-9", "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert report["kl_prompted_base"] > 1e-3 and report["top1_agreement"] == 1.0
    assert cli("merge", "-m", folder, "-p", tmp_path / "p.st", "-o", tmp_path / "merged").exit_code == 0
    res = cli("eval", "-m", folder, "--merged", tmp_path / "merged", "--prompt", prompt, "--queries", queries,
              "--dtype", "float64", "--max-abs-logit-diff", "1e-9", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["sizes"] == report["sizes"]


def test_a_patch_for_one_hybrid_is_refused_by_another(cli, tmp_path):
    lfm2 = save_checkpoint(make_recurrent("lfm2", torch.float32, seed=6), tmp_path / "lfm2")
    granite = save_checkpoint(make_recurrent("granitemoehybrid", torch.float32, seed=6), tmp_path / "granite")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\n")
    assert cli("convert", prompt, "-m", lfm2, "-o", tmp_path / "p.st").exit_code == 0
    res = cli("merge", "-m", granite, "-p", tmp_path / "p.st", "-o", tmp_path / "merged")
    assert_one_line_error(res, "is for a 'lfm2' model, this model is 'granitemoehybrid'")
    res = cli("convert", prompt, "-m", lfm2, "-o", tmp_path / "q.st", "--method", "taylor")
    assert_one_line_error(res, "method 'taylor' does not apply to 'lfm2' models")


def test_rwkv_rescales_its_own_weights_and_merged_folders_still_hold_them_as_trained(cli, tmp_path):
    """RWKV divides some weights in place on its first forward in eval mode. A patched copy must not share them
    (the base would be rescaled twice), and a merged folder made from a model that has run (the command line's
    shape check runs it; so may a library user) must hold them as trained, or the folder rescales them again."""
    from iclca_cli.loading import load_model
    from iclca_cli.merge import merge_patch

    model = make_recurrent("rwkv", torch.float32, seed=7)
    assert model.config.rescale_every == 1  # every block's weights are rescaled
    folder = save_checkpoint(model, tmp_path / "rwkv")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\n")
    queries = tmp_path / "q.txt"
    queries.write_text("gamma: three\nalpha:\n")
    assert cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st", "--dtype", "float64").exit_code == 0
    assert cli("merge", "-m", folder, "-p", tmp_path / "p.st", "-o", tmp_path / "merged").exit_code == 0
    for source in (("-p", tmp_path / "p.st"), ("--merged", tmp_path / "merged")):
        res = cli("eval", "-m", folder, *source, "--prompt", prompt, "--queries", queries, "--dtype", "float64",
                  "--max-abs-logit-diff", "1e-6", "--json")
        assert res.exit_code == 0, (source, res.stderr)
        assert one_json(res)["kl_prompted_base"] > 1e-3
    base, tok = load_model(str(folder), "float64")
    prompt_ids, query = ids(20, 9), ids(5, 10)
    want = logits(base, prompt_ids + query)[20:]  # the base has run: its weights are rescaled now
    patched, patch = convert(base, prompt_ids)
    assert (logits(patched, query) - want).abs().max() <= 1e-6
    merged, _ = load_model(str(merge_patch(base, tok, patch, tmp_path / "merged-after-a-run")), "float64")
    assert (logits(merged, query) - want).abs().max() <= 1e-6


@pytest.mark.parametrize("name", [n for n in HYBRIDS if n != "zamba2"])  # zamba2: see the test below
def test_a_compressed_hybrid_patch_has_a_constant_size_and_keeps_the_recurrent_states_exact(name):
    """Recurrent layers exact, attention layers summarised into R entries per key/value head: the patch does not
    grow with the prompt (a uniform budget; a split is bounded, test_compressed.py), its recurrent states are the
    exact patch's, and it is closer to prompted than nothing."""
    model = make_recurrent(name, seed=8)
    query = ids(6, 11)
    sizes = []
    for P in (20, 40):
        prompt = ids(P, P)
        patched, patch = convert(model, prompt, "compressed", budget=6, split="uniform")
        _, exact = convert(model, prompt)
        parts = patch.bytes_by_part()
        assert parts["attention"] > 0 and parts["recurrent"] == exact.bytes_by_part()["recurrent"] > 0
        for n, t in exact.tensors.items():
            if not n.endswith(("prompt_keys", "prompt_values")):
                assert torch.equal(patch.tensors[n], t), n
        sizes.append(patch.nbytes)
        want = torch.log_softmax(logits(model, prompt + query)[P:], -1)
        kl = lambda x: (want.exp() * (want - torch.log_softmax(x, -1))).sum(-1).mean()  # noqa: E731
        assert kl(logits(patched, query)) < kl(logits(model, query))
    assert sizes[0] == sizes[1]

def test_a_hybrid_without_a_named_attention_module_takes_only_exact():
    """Zamba2's attention block is shared between layers: iclca does not name it, so `compressed` is refused."""
    with pytest.raises(IclcaError, match="method 'compressed' does not apply to 'zamba2' models"):
        convert(make_recurrent("zamba2"), ids(5, 12), "compressed", budget=4)


def test_prompt_kv_bytes_of_a_state_space_model_is_that_of_a_softmax_model_of_its_width():
    """Mamba2's num_heads and head_dim describe its state, not attention: the comparison is a softmax model with
    hidden_size-wide keys and values."""
    from iclca_cli.evaluate import prompt_kv_bytes

    config = make_recurrent("mamba2").config
    assert prompt_kv_bytes(config, 10, 4) == 2 * config.num_hidden_layers * 10 * config.hidden_size * 4
    assert config.num_heads * config.head_dim != config.hidden_size  # so the test tells the two apart
