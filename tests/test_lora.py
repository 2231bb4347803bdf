"""`lora` (a prompt baked into the weights), on every family's tiny published layout and on demo-gpt2:
- the handler is exact: a patch of random updates == the model with W + B A written into its weights (float64,
  <= 1e-10), and the update moves the logits by far more than that;
- merge writes the stock architecture (the base model_type and classes, no auto_map, no code), which a fresh process
  where iclca cannot be imported loads without remote code and which equals the patched model (logits, greedy
  tokens);
- export-peft writes a PEFT LoRA adapter that on the base model equals the merged folder (<= 1e-4), generate() too;
- trained toward the prompted model it takes on the prompt's effect (demo-gpt2's recall), deterministically;
  `--objective ce` trains on the text instead; with --chat it is trained, evaluated and served after the stock chat
  template's own start.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from helpers import (EXAMPLE_PROMPT, ROOT, assert_one_line_error, greedy, logits, one_json, run_fresh_process,
                     save_checkpoint)
from iclca_cli.convert import describe_patch
from iclca_cli.families import all_families, family_of
from iclca_cli.loading import load_model
from iclca_cli.lora_layers import convert as initial_update
from iclca_cli.merge import merge_patch
from iclca_cli.methods import build
from iclca_cli.patch import load_patch, patched_copy, save_patch
from test_contract import FAMILIES, prompt_and_query

QUERIES = ROOT / "configs/examples/recall-queries.jsonl"


def random_update(model, prompt, seed=0, rank=2, **params):
    """A lora patch of this model with random A and B (the handler's exactness does not need training)."""
    patch = describe_patch(model, prompt, "0" * 64, build("lora", rank=rank, **params))
    generator = torch.Generator().manual_seed(seed)
    patch.tensors = {name: (torch.randn(t.shape, generator=generator, dtype=torch.float64) * 0.3).to(t.dtype)
                     for name, t in initial_update(model, family_of(model), prompt, patch.method).items()}
    return patch


def with_update_in_weights(model, patch, probe):
    """The oracle: a copy of the model, run once (a family that rescales its weights for inference does so), with
    W + B A written into each updated module's weight by hand."""
    ref = copy.deepcopy(model)
    logits(ref, probe)
    with torch.no_grad():
        for name, a in patch.tensors.items():
            if name.endswith(".lora_A"):
                module = ref.get_submodule(name.removesuffix(".lora_A"))
                delta = patch.tensors[name.replace("lora_A", "lora_B")] @ a  # (out, in)
                module.weight += delta.T if isinstance(module, Conv1D) else delta
    return ref


@pytest.mark.parametrize("name", FAMILIES)
def test_a_lora_patch_is_the_update_in_the_weights(name):
    case = FAMILIES[name]
    model = case.make(torch.float64)
    prompt, query = prompt_and_query(case, seed=3)
    patch = random_update(model, prompt)
    assert patch.position_offset == 0 and patch.tensors and patch.bytes_by_part()["weights"] == patch.nbytes
    patched = patched_copy(model, patch)
    want = logits(with_update_in_weights(model, patch, query), query)
    assert (logits(patched, query) - want).abs().max() <= 1e-10
    assert (logits(model, query) - want).abs().max() > 1e-3  # the update matters
    assert (logits(patched_copy(patched, patch), query) - want).abs().max() <= 1e-10  # attached twice: once


def test_merged_lora_folders_are_stock_checkpoints(tmp_path):
    """Every family transformers ships: the merged folder has the base's model_type and architectures, no auto_map
    and no modeling file, loads in a fresh process without iclca or remote code, and equals the patched model."""
    cases, expected = [], []
    for name, case in FAMILIES.items():
        if name == "iclca_linear":
            continue  # iclca's own architecture: its folders always carry its modeling code
        base = save_checkpoint(case.make(torch.float64), tmp_path / f"{name}-base")
        model, tokenizer = load_model(str(base), "float64")
        prompt, query = prompt_and_query(case, seed=5)
        patch = random_update(model, prompt, seed=1)
        patched = patched_copy(model, patch)
        folder = merge_patch(model, tokenizer, patch, tmp_path / f"{name}-lora")
        config, base_config = (json.loads((f / "config.json").read_text()) for f in (folder, base))
        assert (config["model_type"], config["architectures"]) == (base_config["model_type"], base_config["architectures"])
        assert "auto_map" not in config and not list(folder.glob("*.py")), name
        cases.append({"folder": str(folder), "dtype": "float64", "query": query, "new_tokens": 8, "remote": False,
                      "eager_experts": True})
        expected.append((name, logits(patched, query), greedy(patched, query, 8)))
    for res, (name, want, want_gen) in zip(run_fresh_process(cases, tmp_path), expected):
        assert res["class"].startswith("transformers.models.") and not res["iclca_imported"], (name, res["class"])
        assert (torch.tensor(res["logits"], dtype=torch.float64) - want).abs().max() <= 1e-10, name
        assert res["generated"] == want_gen, name


@pytest.mark.parametrize("name", ["gpt2", "llama", "lfm2"])
def test_the_peft_lora_adapter_on_the_base_equals_the_merged_folder(name, tmp_path):
    """GPT-2's Conv1D projections, Llama's and LFM2's (a hybrid) linear layers, in float32 as servers run them."""
    from peft import PeftModel

    from iclca_cli.peft_export import write_peft_adapter

    case = FAMILIES[name]
    base = save_checkpoint(case.make(torch.float32), tmp_path / "base")
    model, tokenizer = load_model(str(base), "float32")
    prompt, query = prompt_and_query(case, seed=6)
    patch = random_update(model, prompt, seed=2, rank=4)
    folder, described = write_peft_adapter(model, patch, str(base), tmp_path / "adapter")
    assert described == {"adapter_type": "LORA", "rank": 4, "target_modules": len(patch.tensors) // 2}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    merged, _ = load_model(str(merge_patch(model, tokenizer, patch, tmp_path / "merged")), "float32")
    peft_model = PeftModel.from_pretrained(load_model(str(base), "float32")[0], folder).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([query])).logits[0]
        gen = peft_model.generate(input_ids=torch.tensor([query]), max_new_tokens=8, do_sample=False)[0, len(query):]
    assert (got - logits(merged, query)).abs().max() <= 1e-4
    assert (got - logits(model, query)).abs().max() > 1e-2  # the adapter does something
    assert gen.tolist() == greedy(merged, query, 8)


def test_what_peft_refuses_is_a_one_line_error(tmp_path):
    """PEFT takes no LoRA on Mamba's out_proj (its kernels read the weight): said as an IclcaError, nothing written."""
    from iclca_cli.errors import IclcaError
    from iclca_cli.peft_export import write_peft_adapter

    model = FAMILIES["mamba2"].make(torch.float32)
    patch = random_update(model, [5, 6, 7])
    with pytest.raises(IclcaError, match="PEFT will not write this adapter: .*out_proj"):
        write_peft_adapter(model, patch, "tiny", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    patch = random_update(model, [5, 6, 7], targets="in_proj")
    assert write_peft_adapter(model, patch, "tiny", tmp_path / "adapter")[1]["target_modules"] == 2


def eval_report(cli, patch):
    res = cli("eval", "-m", "demo-gpt2", "--patch", str(patch), "--prompt", EXAMPLE_PROMPT, "--queries", QUERIES, "--json")
    assert res.exit_code == 0, res.stderr
    return one_json(res)


def test_lora_takes_on_the_prompts_effect_deterministically(cli, tmp_path):
    """demo-gpt2 looks values up in its context: without the prompt it knows none of the recall prompt's answers;
    with an update trained toward the prompted model it gives at least half of them (6 of 6 here), at a small fraction
    of the KL (0.15 against 6.8). The same
    inputs and seed give the same bytes; another seed other bytes; the patch says what trained it."""
    args = ("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "lora", "--steps", "200", "--lr", "0.01",
            "--train-on", "lines", "--loss-from", "0")  # its queries are one token ("apple:"): answered at position 0
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        res = cli(*args, "--seed", seed, "--out", str(tmp_path / f"{name}.st"), "--json")
        assert res.exit_code == 0, res.stderr
        assert one_json(res)["position_offset"] == 0
    a, b, c = ((tmp_path / f"{n}.st").read_bytes() for n in "abc")
    assert a == b and a != c
    meta = load_patch(tmp_path / "a.st").metadata()
    assert (meta["iclca.method"], meta["iclca.lora_rank"], meta["iclca.lora_targets"], meta["iclca.lora_objective"],
            meta["iclca.lora_steps"], meta["iclca.lora_inputs"], meta["iclca.lora_loss_from"], meta["iclca.lora_top_k"]
            ) == ("lora", "8", "all-linear", "kl", "200", "lines", "0", "1000")
    report = eval_report(cli, tmp_path / "a.st")
    assert report["accuracy"]["base"] == 0 and report["accuracy"]["patched"] >= 0.5 * report["accuracy"]["prompted"]
    assert report["kl_prompted_patched"] < 0.2 * report["kl_prompted_base"], report


def test_training_defaults_and_what_older_patches_were_made_with():
    """Trained methods train on 128 of the prompt's own lines, the learning rate decayed along a cosine (chosen on
    development prompts: docs/lora.md, docs/smollm2.md); lora 400 steps on the prompted model's top 1000 tokens
    from each input's second position, compressed --refine 100 on its top 20 at every position. With --chat on 32
    user turns the prompted model writes (a generation each), and on 32 inputs wherever some are sampled. A patch
    written before --train-count and --schedule were recorded reads as what made it (32 inputs, a constant rate),
    and --help gives each method's default where they differ."""
    from iclca_cli.cli import _param_help
    from iclca_cli.training import Training

    lora = build("lora")
    assert lora.training() == Training(steps=400, inputs=128, sources=("lines",), schedule="cosine", top_k=1000,
                                       loss_from=1)
    assert (lora.training(chat=True).sources, lora.training(chat=True).inputs) == (("turns",), 32)
    assert build("lora", train_on="lines+samples").training().inputs == 32
    assert build("lora", train_count=7).training(chat=True).inputs == 7
    refine = build("compressed", budget=4, refine=True)
    assert refine.training() == Training(steps=100, inputs=128, sources=("lines",), schedule="cosine") == Training()
    for method, key in ((lora, "lora"), (refine, "refine")):
        meta = {k: v for k, v in method.metadata().items()
                if k not in (f"{key}_train_count", f"{key}_schedule", f"{key}_top_k", f"{key}_loss_from")}
        old = type(method).from_metadata(meta, "old.st").training()
        assert (old.inputs, old.schedule, old.top_k, old.loss_from) == (32, "constant", 20, 0)
    fitted = build("compressed", budget=4)  # an unrefined patch records no training keys: they read as the defaults
    assert type(fitted).from_metadata(fitted.metadata(), "fitted.st") == fitted
    assert "(default compressed 100, lora 400)" in _param_help("steps")
    assert "(default cosine)" in _param_help("schedule")
    assert "(default compressed 20, lora 1000)" in _param_help("top_k")
    assert "(default compressed 0, lora 1)" in _param_help("loss_from")


def test_the_ce_objective_trains_on_the_text(cli, tmp_path):
    """Fine-tuning on the prompt's text (next-token cross-entropy) is another update than distillation, and also
    moves the model toward the prompt's answers."""
    out = {}
    for objective in ("kl", "ce"):
        res = cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "lora", "--steps", "40", "--lr", "0.01",
                  "--objective", objective, "--targets", "c_attn", "--loss-from", "0",  # one-token queries
                  "--out", str(tmp_path / f"{objective}.st"))
        assert res.exit_code == 0, res.stderr
        out[objective] = load_patch(tmp_path / f"{objective}.st")
    assert set(out["ce"].tensors) == {f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    assert any((out["ce"].tensors[n] - out["kl"].tensors[n]).abs().max() > 1e-3 for n in out["ce"].tensors)
    report = eval_report(cli, tmp_path / "ce.st")
    assert report["kl_prompted_patched"] < report["kl_prompted_base"], report


@pytest.mark.parametrize("args,fragments", [
    (("--targets", "q_proj"), ("--targets q_proj", "no such linear module")),
    (("--targets", "c_attn,,"), ("is not all-linear or module names",)),
    (("--rank", "0"), ("--rank",)),
    (("--objective", "mse"), ("--objective 'mse' is not one of kl, ce",)),
    (("--budget", "4"), ("--budget applies to",)),
])
def test_bad_lora_options_are_one_line_errors(cli, tmp_path, args, fragments):
    res = cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "lora", *args, "--out", str(tmp_path / "x.st"))
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "x.st").exists()


def test_a_lora_patch_whose_query_starts_after_the_prompt_is_refused(tmp_path):
    model, _ = load_model("demo-gpt2", "float32")
    patch = random_update(model, [5, 6, 7])
    patch.position_offset = 3
    save_patch(patch, tmp_path / "bad.st")
    with pytest.raises(Exception, match="position_offset 3 for a lora patch"):
        load_patch(tmp_path / "bad.st")


def test_every_family_takes_lora():
    from iclca_cli.methods import applicable

    for name, case in FAMILIES.items():
        assert "lora" in [m.name for m in applicable(all_families()[name], case.make(torch.float32).config)], name


@pytest.fixture(scope="module")
def default_system_chat(tmp_path_factory):
    """A tiny chat model whose template adds a system turn of its own where a conversation has none, as SmolLM2's."""
    from helpers import CHATML_DEFAULT_SYSTEM, make_decoder, save_chat_checkpoint

    return save_chat_checkpoint(make_decoder("Llama", torch.float32, 72), tmp_path_factory.mktemp("m") / "chat",
                                CHATML_DEFAULT_SYSTEM)


def test_lora_bakes_a_chat_prompt_for_the_stock_template(cli, tmp_path, default_system_chat):
    """A chat server renders a query to a baked model with the stock template: its own system turn, then the user's.
    lora --chat trains the student on exactly that (after the template's own start) toward the model that read the
    system prompt, on user turns the prompted model writes and answers itself (--train-on auto: turns); eval and
    generate --chat read each query as a server would, the merged folder keeps the stock template, and the update
    brings held-out user turns much closer to the prompted model than the plain model served the same way."""
    from iclca_cli import chat

    folder = default_system_chat
    system, queries = tmp_path / "system.txt", tmp_path / "q.txt"
    system.write_text("alpha: one\nbeta: two\ngamma: three\ndelta: four\n")
    queries.write_text("beta:\ngamma: three alpha:\nfive six\ndelta\n")
    res = cli("convert", system, "-m", folder, "--method", "lora", "--chat", "--steps", "60", "--lr", "0.01",
              "--out", tmp_path / "l.st", "--json")
    assert res.exit_code == 0, res.stderr
    meta = load_patch(tmp_path / "l.st").metadata()
    assert (meta["iclca.lora_inputs"], meta["iclca.chat_roles"], meta["iclca.position_offset"]) == ("auto", "system", "0")
    res = cli("eval", "-m", folder, "-p", tmp_path / "l.st", "--prompt", system, "--queries", queries, "--chat", "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert report["kl_prompted_patched"] < 0.5 * report["kl_prompted_base"], report

    merged = tmp_path / "merged"
    assert cli("merge", "-m", folder, "-p", tmp_path / "l.st", "-o", merged).exit_code == 0
    _, tokenizer = load_model(str(folder))
    _, merged_tokenizer = load_model(str(merged))
    assert merged_tokenizer.chat_template == tokenizer.chat_template  # stock: a server renders its own system turn
    messages = [{"role": "system", "content": system.read_text()}]
    head = chat.served_head(tokenizer, ["system"])
    assert tokenizer.decode(head).count("alpha beta") == 1  # the template's own system turn
    served = merged_tokenizer(merged_tokenizer.apply_chat_template([{"role": "user", "content": "beta:"}],
                              add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    assert served == head + chat.query_ids(tokenizer, messages, "beta:")
    said = [one_json(cli("generate", "beta:", "delta", "-m", folder, *source, "--chat", "--max-new-tokens", "5",
                         "--json"))["generations"] for source in (("--patch", tmp_path / "l.st"), ("--merged", merged))]
    assert [g["tokens"]["patched"] for g in said[0]] == [g["tokens"]["patched"] for g in said[1]]
    base = load_model(str(folder))[0]
    assert said[0][0]["tokens"]["patched"] == greedy(load_model(str(merged))[0], served, 5) != greedy(base, served, 5)


def test_a_template_that_renders_a_first_user_turn_otherwise_is_refused_for_lora(cli, tmp_path):
    """A weight patch stands for the conversation only where a server's first user turn is rendered as one after it."""
    from helpers import CHATML, make_decoder, save_chat_checkpoint

    first_apart = CHATML.replace("<|im_start|>{{ m['role'] }}", "<|im_start|>{{ 'alpha' if loop.first and "
                                 "m['role'] == 'user' else m['role'] }}")
    folder = save_chat_checkpoint(make_decoder("Llama", torch.float32, 72), tmp_path / "chat", first_apart)
    system = tmp_path / "system.txt"
    system.write_text("alpha: one\n")
    res = cli("convert", system, "-m", folder, "--method", "lora", "--chat", "--out", tmp_path / "x.st")
    assert_one_line_error(res, "renders a conversation's first user turn otherwise")
    assert not (tmp_path / "x.st").exists()


def test_a_lora_patched_copy_shares_the_weights_and_leaves_the_base_as_it_was():
    """`iclca eval` holds the base and the patched model at once: the update is a parametrization of the copy's
    weights, never written into the parameters both share."""
    from helpers import make_llama

    model = make_llama()
    query = torch.tensor([[3, 7, 9]])
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=query).logits
    patched = patched_copy(model, random_update(model, [5, 6, 7, 8]))
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in patched.parameters())
    assert not torch.allclose(patched(input_ids=query).logits, before)
    torch.testing.assert_close(model(input_ids=query).logits, before, rtol=0, atol=0)
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())


def test_the_change_cosine_of_the_exact_patch_is_one():
    """scripts/real_model.py's comparison of ICL with weight updates (Dai et al.): the change the exact prefix
    patch makes to a query's hidden states is the prompt's own (cosine 1 at every layer); a random update's is not."""
    from helpers import convert, load_script, make_llama, random_ids

    real = load_script("real_model")
    model = make_llama()
    prompt, queries = random_ids(12, 61, 1), [(random_ids(3, 61, 2), random_ids(2, 61, 3))]
    exact, _ = convert(model, prompt, "prefix")
    cosine = real.change_cosines(model, exact, prompt, queries)
    assert len(cosine) == model.config.num_hidden_layers and (cosine - 1).abs().max() <= 1e-6
    other = real.change_cosines(model, patched_copy(model, random_update(model, prompt)), prompt, queries)
    assert (other - 1).abs().min() > 1e-2
