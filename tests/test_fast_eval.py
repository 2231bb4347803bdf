"""`iclca eval` reads the prompt once: the prompted reference continues each query from a copy of the prompt's
cache where the family's stock model continues from a cache correctly, and re-reads the prompt where it does not.
Both paths give the same logits, greedy tokens and report (float64, tiny models of every contract family)."""

import pytest
import torch

from helpers import make_recurrent
from iclca_cli.evaluate import PromptedReference, evaluate
from iclca_cli.families import family_named
from iclca_cli.inputs import Query
from iclca_cli.loading import load_model
from iclca_cli.patch import load_patch, patched_copy
from test_contract import FAMILIES

P, Q, NEW = 30, 6, 8


def prompt_and_query(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(3, vocab, (P + Q,), generator=g)).tolist()  # above the special tokens
    return ids[:P], ids[P:]


@pytest.mark.parametrize("name", [n for n in FAMILIES if family_named(n).stock_cache_continues])
def test_reading_the_prompt_once_gives_what_rereading_gives(name):
    case = FAMILIES[name]
    model = case.make(torch.float64)
    prompt, query = prompt_and_query(case.vocab, 1)
    fast, slow = PromptedReference(model, prompt), PromptedReference(model, prompt, reuse_cache=False)
    assert fast.reuse and not slow.reuse
    for q in (query, query[:1], query):  # one query after another from the same prompt cache: copies, not shared
        (lf, gf), (ls, gs) = fast.run(q, NEW), slow.run(q, NEW)
        assert lf.shape == ls.shape == (len(q), lf.shape[-1])
        bound = 1e-10 + case.noise
        if case.reference_attention:  # Gemma 2's stock attention takes its softmax in float32 (test_contract.py)
            bound += 1e-5
        if len(q) == 1 and family_named(name).positions == "cache":  # a one-token call takes the state-space
            bound += 1e-6  # step kernel, which keeps the SSM state in float32, where one pass over P + 1 does not
        assert (lf - ls).abs().max() <= bound, name
        assert gf == gs


@pytest.mark.parametrize("name", ["mamba", "bamba", "xlstm", "rwkv"])
def test_families_whose_stock_cache_continuation_iclca_fixes_reread_the_prompt(name):
    assert not family_named(name).stock_cache_continues
    model = make_recurrent(name, torch.float64, 5)
    prompt, query = prompt_and_query(61, 2)
    assert not PromptedReference(model, prompt).reuse


def test_mamba_continuing_its_stock_cache_would_be_wrong():
    """Why the allow-list: Mamba's stock mixers restart their scan on a multi-token call with a cache."""
    model = make_recurrent("mamba", torch.float64, 5)
    prompt, query = prompt_and_query(61, 3)
    forced, slow = PromptedReference(model, prompt, reuse_cache=True), PromptedReference(model, prompt, reuse_cache=False)
    assert (forced.run(query, 0)[0] - slow.run(query, 0)[0]).abs().max() > 1e-3


def test_the_report_is_the_same_either_way(tmp_path, cli):
    from helpers import ROOT

    prompt = (ROOT / "configs/examples/recall-prompt.txt").read_text()
    queries = [Query(q["input"], q["target"]) for q in
               map(__import__("json").loads, (ROOT / "configs/examples/recall-queries.jsonl").read_text().splitlines())]
    assert cli("convert", ROOT / "configs/examples/recall-prompt.txt", "-m", "demo-gpt2", "-o", tmp_path / "p.st",
               "--dtype", "float64").exit_code == 0
    base, tokenizer = load_model("demo-gpt2", "float64")
    patch = load_patch(tmp_path / "p.st")
    reports = [evaluate(base, patched_copy(base, patch), tokenizer, prompt, queries, patch.method, patch.nbytes, 8,
                        reuse_cache=reuse) for reuse in (True, False)]
    for r in reports:
        r.pop("timing")
    fast, slow = reports
    assert fast["accuracy"] == slow["accuracy"] and fast["accuracy"]["prompted"] == 1.0
    for key in ("max_abs_logit_diff", "kl_prompted_patched", "kl_prompted_base", "top1_agreement"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-6, abs=1e-12), key
    assert {k: v for k, v in fast.items() if not isinstance(v, float)} == \
        {k: v for k, v in slow.items() if not isinstance(v, float)}


def test_one_pass_on_the_command_line_is_the_reread_reference(tmp_path, cli):
    """--one-pass takes the other reference: in float32 the two round differently, both far below the bound."""
    from helpers import ROOT, one_json

    prompt, queries = ROOT / "configs/examples/recall-prompt.txt", ROOT / "configs/examples/recall-queries.jsonl"
    assert cli("convert", prompt, "-m", "demo-gpt2", "-o", tmp_path / "p.st").exit_code == 0
    run = lambda *a: one_json(cli("eval", "-m", "demo-gpt2", "-p", tmp_path / "p.st", "--prompt", prompt,  # noqa: E731
                                  "--queries", queries, "--json", *a))
    cached, one_pass = run(), run("--one-pass")
    assert cached["max_abs_logit_diff"] != one_pass["max_abs_logit_diff"]
    assert max(cached["max_abs_logit_diff"], one_pass["max_abs_logit_diff"]) <= 1e-4
    assert one_pass["accuracy"] == cached["accuracy"] and one_pass["accuracy"]["patched"] == 1.0
