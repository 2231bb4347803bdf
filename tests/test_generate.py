"""`iclca generate` and eval's answers: what a patched or merged model says, token for token what the stock model
says after the prompt; and a merged --chat folder is a chat model (its chat template renders a conversation as it
continues after the baked system prompt)."""

import json

import pytest
import torch

from helpers import (EXAMPLE_PROMPT, EXAMPLE_QUERIES, assert_one_line_error, logits, make_decoder, one_json,
                     save_chat_checkpoint)
from iclca_cli.inputs import encode_continuation, encode_prompt
from iclca_cli.loading import load_model

QUERIES = ["river:", "apple:", "piano:"]


def stock_greedy(model, ids, n):
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["demo-gpt2", "demo-mamba2", "demo-lfm2"])  # softmax, recurrent, hybrid
def test_generate_says_what_the_stock_model_says_after_the_prompt(cli, tmp_path, name):
    patch, merged = tmp_path / "p.safetensors", tmp_path / "merged"
    assert cli("convert", EXAMPLE_PROMPT, "-m", name, "-o", patch).exit_code == 0
    assert cli("merge", "-m", name, "-p", patch, "-o", merged).exit_code == 0
    base, tokenizer = load_model(name)
    prompt = encode_prompt(tokenizer, EXAMPLE_PROMPT.read_text())
    want = [stock_greedy(base, prompt + encode_continuation(tokenizer, q), 8) for q in QUERIES]
    alone = [stock_greedy(base, encode_continuation(tokenizer, q), 8) for q in QUERIES]
    assert want != alone  # the prompt decides the answers
    for source in (("--patch", patch), ("--merged", merged)):
        res = cli("generate", *QUERIES, "-m", name, *source, "--max-new-tokens", "8", "--json")
        assert res.exit_code == 0, res.stderr
        rows = one_json(res)["generations"]
        assert [r["input"] for r in rows] == QUERIES
        assert [r["tokens"]["patched"] for r in rows] == want
        assert [r["patched"] for r in rows] == [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    res = cli("generate", "river:", "-m", name, "--patch", patch, "--max-new-tokens", "8")  # streamed, as text
    assert res.exit_code == 0 and res.stdout.startswith("> river:\n")
    assert tokenizer.decode(want[0], skip_special_tokens=True) in res.stdout


def test_compare_shows_the_prompted_and_the_plain_model(cli, tmp_path):
    patch = tmp_path / "p.safetensors"
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "-o", patch).exit_code == 0
    assert_one_line_error(cli("generate", "river:", "-m", "demo-gpt2", "-p", patch, "--compare"), "needs the prompt")
    res = cli("generate", "river:", "-m", "demo-gpt2", "-p", patch, "--compare", "--prompt", EXAMPLE_PROMPT,
              "--max-new-tokens", "4", "--json")
    row = one_json(res)["generations"][0]
    assert row["tokens"]["patched"] == row["tokens"]["prompted"] != row["tokens"]["base"]
    text = cli("generate", "river:", "-m", "demo-gpt2", "-p", patch, "--compare", "--prompt", EXAMPLE_PROMPT,
               "--max-new-tokens", "4").stdout
    assert [line.split(":")[0] for line in text.splitlines()[1:]] == ["patched", "prompted", "base"]


def test_sampling_is_seeded_and_its_options_are_checked(cli, tmp_path):
    patch = tmp_path / "p.safetensors"
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-linear", "-o", patch).exit_code == 0
    args = ("generate", *QUERIES, "-m", "demo-linear", "-p", patch, "--temperature", "5", "--max-new-tokens", "6",
            "--json")
    runs = [one_json(cli(*args, "--seed", seed))["generations"] for seed in ("1", "1", "2")]
    assert runs[0] == runs[1] != runs[2]
    assert_one_line_error(cli("generate", "river:", "-m", "demo-linear", "-p", patch, "--top-p", "0"), "--top-p")
    assert_one_line_error(cli("generate", "-m", "demo-linear", "-p", patch), "no query")


def test_eval_reports_the_answers(cli, tmp_path):
    patch = tmp_path / "p.safetensors"
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "-o", patch).exit_code == 0
    args = ("eval", "-m", "demo-gpt2", "-p", patch, "--prompt", EXAMPLE_PROMPT, "--queries", EXAMPLE_QUERIES)
    report = one_json(cli(*args, "--json"))
    queries = [json.loads(line) for line in EXAMPLE_QUERIES.read_text().splitlines() if line.strip()]
    assert [a["input"] for a in report["answers"]] == [q["input"] for q in queries]
    assert all(set(a) == {"input", "target", "prompted", "patched", "base"} for a in report["answers"])
    assert [a["patched"] for a in report["answers"]] == [a["prompted"] for a in report["answers"]]
    assert report["accuracy"]["patched"] == sum(a["patched"] == a["target"] for a in report["answers"]) / len(queries)
    table = cli(*args, "--show", "2").stdout
    assert "answers (greedy)" in table and queries[1]["input"] in table and queries[2]["input"] not in table


def test_convert_and_inspect_name_the_file_and_the_tensors_apart(cli, tmp_path):
    patch = tmp_path / "p.safetensors"
    row = one_json(cli("convert", EXAMPLE_PROMPT, "-m", "demo-linear", "-o", patch, "--json"))
    info = one_json(cli("inspect", patch, "--json"))
    assert row["file_bytes"] == info["file_bytes"] == patch.stat().st_size
    assert row["patch_bytes"] == info["patch_bytes"] < row["file_bytes"]  # the header holds the metadata


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_chat_checkpoint(make_decoder("Llama", torch.float64, 73), tmp_path_factory.mktemp("m") / "chat")


def test_a_merged_chat_folder_is_a_chat_model(cli, tmp_path, chat_model):
    """float64: apply_chat_template(user messages) on the merged folder's tokenizer gives the tokens that follow the
    system prompt, so generate() and the text-generation pipeline on the merged model equal the stock model on the
    system prompt plus the same messages."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    system = tmp_path / "system.txt"
    system.write_text("alpha: one\nbeta: two\ngamma: three\n")
    patch, merged = tmp_path / "p.safetensors", tmp_path / "merged"
    assert cli("convert", system, "-m", chat_model, "-o", patch, "--chat", "--dtype", "float64").exit_code == 0
    assert cli("merge", "-m", chat_model, "-p", patch, "-o", merged).exit_code == 0
    base, tokenizer = load_model(str(chat_model), "float64")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float64, trust_remote_code=True).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(merged)
    for messages in ([{"role": "user", "content": "beta"}],
                     [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "gamma beta"}]):
        whole = tokenizer.apply_chat_template([{"role": "system", "content": system.read_text()}, *messages],
                                              add_generation_prompt=True, tokenize=False)
        whole_ids = tokenizer(whole, add_special_tokens=False).input_ids
        rendered = merged_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = merged_tokenizer(rendered, add_special_tokens=False).input_ids
        P = len(whole_ids) - len(ids)
        assert whole_ids[P:] == ids and P > 10
        assert (logits(model, ids) - logits(base, whole_ids)[P:]).abs().max() <= 1e-10
        assert stock_greedy(model, ids, 6) == stock_greedy(base, whole_ids, 6)
        generator = pipeline("text-generation", model=model, tokenizer=merged_tokenizer)
        said = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]["content"]
        assert said == tokenizer.decode(stock_greedy(base, whole_ids, 6), skip_special_tokens=True)
    res = cli("generate", "beta", "-m", chat_model, "--merged", merged, "--chat", "--dtype", "float64",
              "--max-new-tokens", "6", "--json")  # the roles the patch recorded: no --prompt needed
    want = stock_greedy(base, tokenizer(tokenizer.apply_chat_template(
        [{"role": "system", "content": system.read_text()}, {"role": "user", "content": "beta"}],
        add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids, 6)
    assert one_json(res)["generations"][0]["tokens"]["patched"] == want


def test_a_merged_folders_tokenizer_loads_quietly_where_iclca_is_imported(cli, tmp_path, capfd):
    from transformers import AutoTokenizer

    patch, merged = tmp_path / "p.safetensors", tmp_path / "merged"
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "-o", patch).exit_code == 0
    assert cli("merge", "-m", "demo-gpt2", "-p", patch, "-o", merged).exit_code == 0
    capfd.readouterr()
    AutoTokenizer.from_pretrained(merged)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_the_walkthrough_is_the_saved_transcript():
    """docs/walkthrough.md is what scripts/walkthrough.sh printed (it needs SmolLM2, so it is not rerun here), and
    every line of the README's excerpt is in that transcript."""
    import re

    from helpers import ROOT

    transcript = (ROOT / "scripts/results/walkthrough.txt").read_text()
    assert transcript.strip() in (ROOT / "docs/walkthrough.md").read_text()
    readme = (ROOT / "README.md").read_text()
    excerpt = re.search(r"## Bake a system prompt.*?```text\n(.*?)```", readme, re.S).group(1)
    lines = set(transcript.splitlines())
    assert all(line in lines for line in excerpt.splitlines()), [x for x in excerpt.splitlines() if x not in lines]
    assert "patched:  The lighthouse was built in 1847" in excerpt
