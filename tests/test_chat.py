"""`--chat`: the prompt file is rendered with the tokenizer's chat template (a system message, or a .jsonl of
turns) and each query is a user turn plus the generation prompt; the patched model on a query equals the model on
the whole rendered conversation, read in one pass (float64)."""

import json

import pytest
import torch

from helpers import assert_one_line_error, logits, make_decoder, one_json, save_chat_checkpoint
from iclca_cli import chat
from iclca_cli.loading import load_model
from iclca_cli.patch import load_patch, patched_copy

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_chat_checkpoint(make_decoder("Llama", torch.float32, 72), tmp_path_factory.mktemp("m") / "chat")


def conversation_ids(tokenizer, messages, query):
    text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", ["system", "few-shot"])
def test_patched_on_a_user_turn_equals_the_model_on_the_whole_conversation(cli, tmp_path, chat_model, kind):
    if kind == "system":
        prompt = tmp_path / "system.txt"
        prompt.write_text("alpha: one\nbeta: two\ngamma: three\n")
        messages = [{"role": "system", "content": prompt.read_text()}]
    else:
        messages = [{"role": "system", "content": "alpha: one"}, {"role": "user", "content": "beta:"},
                    {"role": "assistant", "content": "two"}, {"role": "user", "content": "gamma:"},
                    {"role": "assistant", "content": "three"}]
        prompt = tmp_path / "turns.jsonl"
        prompt.write_text("\n".join(json.dumps(m) for m in messages) + "\n")
    res = cli("convert", prompt, "-m", chat_model, "-o", tmp_path / "p.st", "--chat", "--dtype", "float64")
    assert res.exit_code == 0, res.stderr
    model, tokenizer = load_model(str(chat_model), "float64")
    patched = patched_copy(model, load_patch(tmp_path / "p.st"))
    for query in ("beta:", "delta: four alpha:"):
        whole = conversation_ids(tokenizer, messages, query)
        q_ids = chat.query_ids(tokenizer, messages, query)
        P = len(whole) - len(q_ids)
        assert whole[P:] == q_ids and tokenizer.convert_ids_to_tokens(whole[:1]) == ["<|im_start|>"]
        prompted = logits(model, whole)[P:]
        assert (logits(patched, q_ids) - prompted).abs().max() <= 1e-10
        assert (logits(model, q_ids) - prompted).abs().max() > 1e-2  # the conversation's start matters
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "beta:"}\n{"input": "delta: four alpha:"}\n')
    res = cli("eval", "-m", chat_model, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries", queries, "--chat",
              "--dtype", "float64", "--max-abs-logit-diff", "1e-10", "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert report["prompt_tokens"] == P and report["top1_agreement"] == 1.0
    res = cli("eval", "-m", chat_model, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries", queries)
    assert_one_line_error(res, "is not the prompt this patch was made from")
    assert "hint: the patch was made with --chat: add --chat" in res.stderr  # the same file, read as raw text


def test_a_template_that_writes_today_s_date_is_named_when_the_prompt_no_longer_matches(cli, tmp_path, chat_model,
                                                                                       monkeypatch):
    """A template calling strftime_now renders the conversation with the day's date: on another day the prompt
    does not match the patch, and the hint says why."""
    from datetime import datetime

    from transformers.utils import chat_template_utils

    model, tokenizer = load_model(str(chat_model))
    tokenizer.chat_template = "{{ strftime_now('%d %b %Y') }}\n" + tokenizer.chat_template
    folder = tmp_path / "dated"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt = tmp_path / "system.txt"
    prompt.write_text("alpha: one\n")
    (tmp_path / "q.jsonl").write_text('{"input": "beta:"}\n')
    assert cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st", "--chat").exit_code == 0
    ask = ("eval", "-m", folder, "-p", tmp_path / "p.st", "--prompt", prompt, "--queries", tmp_path / "q.jsonl", "--chat")
    assert cli(*ask).exit_code == 0

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2031, 1, 2)

    monkeypatch.setattr(chat_template_utils, "datetime", Later)
    res = cli(*ask)
    assert_one_line_error(res, "is not the prompt this patch was made from")
    assert "writes today's date" in res.stderr


def test_a_model_without_a_chat_template_is_refused_in_one_line(cli, tmp_path):
    (tmp_path / "s.txt").write_text("alpha: one\n")
    assert_one_line_error(cli("convert", tmp_path / "s.txt", "-m", "demo-linear", "-o", tmp_path / "p.st", "--chat"),
                          "--chat needs a chat template")


def test_a_malformed_message_file_is_refused_in_one_line(cli, tmp_path, chat_model):
    (tmp_path / "m.jsonl").write_text('{"role": "system", "content": "alpha"}\n{"role": "robot", "content": "x"}\n')
    assert_one_line_error(cli("convert", tmp_path / "m.jsonl", "-m", chat_model, "-o", tmp_path / "p.st", "--chat"),
                          "line 2 is not a message")
