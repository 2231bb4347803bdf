"""`--device-map auto`: accelerate's big-model placement, here forced to offload by a memory limit (CPU only, as in
CI: the layers that do not fit go to disk and come back for each forward). Conversion works wherever each layer
lives and is exactly as exact as on one device: same patch bytes, float64 patched == prompted to 1e-10."""

import pytest
import torch

from helpers import (assert_one_line_error, logits, make_decoder, make_gpt2_model, make_linear_model, make_recurrent,
                     one_json, random_ids, save_checkpoint)
from iclca_cli.convert import convert_prompt
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.loading import load_model
from iclca_cli.patch import patched_copy

P, Q = 30, 6
MODELS = {
    "llama": lambda: make_decoder("Llama", torch.float64, 72),
    "gpt2": lambda: make_gpt2_model(71, torch.float64, vocab_size=97),
    "iclca_linear": lambda: make_linear_model(70, torch.float64),
    "lfm2": lambda: make_recurrent("lfm2", torch.float64, 81),
}


def offloaded(folder, limit):
    model, _ = load_model(str(folder), "float64", device_map="auto", max_memory=f"cpu={limit}")
    placed = set(model.hf_device_map.values())
    assert "disk" in placed, model.hf_device_map  # the memory limit forced offloading
    return model


@pytest.mark.parametrize("name", MODELS)
def test_an_offloaded_model_converts_the_same_patch_and_is_as_exact(tmp_path, name):
    folder = save_checkpoint(MODELS[name](), tmp_path / name)
    single, _ = load_model(str(folder), "float64")
    weight_bytes = sum(p.numel() * p.element_size() for p in single.parameters())
    model = offloaded(folder, f"{weight_bytes // 3 // 1024}KB")  # a third of the weights stay in memory
    assert model_fingerprint(model) == model_fingerprint(single)
    vocab = single.config.vocab_size
    ids = [i + 3 for i in random_ids(P + Q, min(vocab, 61) - 3, 4)]
    want = convert_prompt(single, ids[:P], "0" * 64)
    got = convert_prompt(model, ids[:P], "0" * 64)
    assert got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[n].cpu(), want.tensors[n]) for n in want.tensors)
    prompted = logits(single, ids)[P:]  # one pass on one device
    patched = logits(patched_copy(model, got), ids[P:])
    assert (patched - prompted).abs().max() <= 1e-10
    assert (logits(single, ids[P:]) - prompted).abs().max() > 1e-3


def test_the_command_line_converts_and_evaluates_with_an_offloading_placement(cli, tmp_path):
    folder = save_checkpoint(make_decoder("Llama", torch.float64, 72), tmp_path / "llama")
    prompt, queries = tmp_path / "prompt.txt", tmp_path / "q.jsonl"
    prompt.write_text("alpha: one\nbeta: two\ngamma: three\n")
    queries.write_text('{"input": "beta:"}\n{"input": "gamma: three alpha:"}\n')
    placement = ("--device-map", "auto", "--max-memory", "cpu=200KB", "--dtype", "float64")
    assert cli("convert", prompt, "-m", folder, "-o", tmp_path / "map.st", *placement).exit_code == 0
    assert cli("convert", prompt, "-m", folder, "-o", tmp_path / "one.st", "--dtype", "float64").exit_code == 0
    assert (tmp_path / "map.st").read_bytes() == (tmp_path / "one.st").read_bytes()
    res = cli("eval", "-m", folder, "-p", tmp_path / "map.st", "--prompt", prompt, "--queries", queries, *placement,
              "--max-abs-logit-diff", "1e-10", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["kl_prompted_base"] > 1e-4


def test_bad_placements_are_one_line_errors(cli, tmp_path):
    (tmp_path / "p.txt").write_text("alpha: one\n")
    run = lambda *a: cli("convert", tmp_path / "p.txt", "-m", "demo-linear", "-o", tmp_path / "p.st", *a)  # noqa: E731
    assert_one_line_error(run("--device", "tpu"), "unsupported device 'tpu'")
    if not torch.cuda.is_available():
        assert_one_line_error(run("--device", "cuda:1"), "--device cuda:1 asked for, but this machine has no CUDA device")
    assert_one_line_error(run("--device-map", "balanced"), "unsupported --device-map 'balanced'")
    assert_one_line_error(run("--max-memory", "cpu=1GB"), "--max-memory limits --device-map auto")
    assert_one_line_error(run("--device-map", "auto", "--max-memory", "lots"), "cannot read --max-memory part 'lots'")


def test_an_offloaded_model_refines_a_summary_as_one_device_does(tmp_path):
    """`compressed --refine` with the frozen weights offloaded (a third in memory, the rest on disk, back for each
    forward and kept for its backward): the trained tensors equal those trained on one device, bit for bit."""
    from iclca_cli.methods import build

    folder = save_checkpoint(MODELS["llama"](), tmp_path / "llama")
    single, _ = load_model(str(folder), "float64")
    weight_bytes = sum(p.numel() * p.element_size() for p in single.parameters())
    model = offloaded(folder, f"{weight_bytes // 3 // 1024}KB")
    ids = [i + 3 for i in random_ids(P, 58, 4)]
    method = build("compressed", budget=4, refine=True, steps=6)
    want = convert_prompt(single, ids, "0" * 64, method)
    got = convert_prompt(model, ids, "0" * 64, method)
    fitted = convert_prompt(single, ids, "0" * 64, build("compressed", budget=4))
    assert all(torch.equal(got.tensors[n].cpu(), want.tensors[n]) for n in want.tensors)
    assert any(not torch.equal(want.tensors[n], fitted.tensors[n]) for n in want.tensors)  # training moved them


def test_lora_with_offloaded_weights_is_refused_in_one_line(tmp_path):
    """The update is a parametrization of the weights, which accelerate's offloading replaces: refused, not wrong."""
    from iclca_cli.errors import IclcaError
    from iclca_cli.methods import build

    folder = save_checkpoint(MODELS["llama"](), tmp_path / "llama")
    single, _ = load_model(str(folder), "float64")
    weight_bytes = sum(p.numel() * p.element_size() for p in single.parameters())
    model = offloaded(folder, f"{weight_bytes // 3 // 1024}KB")
    with pytest.raises(IclcaError, match="lora with weights offloaded by --device-map is not supported yet"):
        convert_prompt(model, [i + 3 for i in random_ids(P, 58, 4)], "0" * 64, build("lora", rank=2, steps=2))
