"""Every bad input gets a one-line answer and exit code 2, nothing is lost, no code runs by surprise."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import EXAMPLE_PROMPT, make_linear_model, save_checkpoint, tree_digest
from helpers import assert_one_line_error, one_json

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def inputs_digest(w):
    return {"model": tree_digest(w["model"]), **{k: w[k].read_bytes() for k in ("prompt", "queries", "patch")}}


def test_every_command_leaves_its_inputs_byte_identical(cli, work):
    w, before = work, inputs_digest(work)
    out = w["dir"]
    assert cli("convert", w["prompt"], "-m", w["model"], "-o", out / "p2.st", "--base-patch", w["patch"]).exit_code == 0
    assert cli("inspect", w["patch"]).exit_code == 0
    assert cli("merge", "-m", w["model"], "-p", w["patch"], "-o", out / "merged").exit_code == 0
    assert cli("eval", "-m", w["model"], "-p", w["patch"], "--prompt", w["prompt"], "--queries", w["queries"]).exit_code == 0
    assert cli("eval", "-m", w["model"], "--merged", out / "merged", "--prompt", w["prompt"],
               "--queries", w["queries"]).exit_code == 0
    assert inputs_digest(w) == before


def test_merging_twice_gives_identical_weights(cli, work):
    w = work
    for name in ("a", "b"):
        assert cli("merge", "-m", w["model"], "-p", w["patch"], "-o", w["dir"] / name).exit_code == 0
    assert tree_digest(w["dir"] / "a") == tree_digest(w["dir"] / "b")


BAD_QUERIES = [
    ('{"input": "river:"}\nnot json\n', "line 2 is not valid JSON"),
    ('{"input": 3}\n', 'line 1 has no string "input"'),
    ('["river:"]\n', 'line 1 has no string "input"'),
    ('{"input": "river:", "target": 3}\n', '"target" must be a string'),
    ("\n\n", "holds no query"),
    ('{"input": ""}\n', "query 1 has no tokens"),
]


@pytest.mark.parametrize("content,message", BAD_QUERIES, ids=[m for _, m in BAD_QUERIES])
def test_malformed_queries(cli, work, content, message):
    (work["dir"] / "q.jsonl").write_text(content)
    res = cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"], "--queries", work["dir"] / "q.jsonl")
    assert_one_line_error(res, message)


def test_prompt_path_that_is_a_folder(cli, work):
    assert_one_line_error(cli("convert", work["dir"], "-m", work["model"], "-o", work["dir"] / "p.st"), "is a folder")


def test_model_folder_without_weights(cli, work):
    (work["model"] / "model.safetensors").unlink()
    assert_one_line_error(cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "p.st"),
                          "has no model.safetensors")


def test_pickled_weights_are_refused_unless_allowed(cli, work):
    model = make_linear_model(50, torch.float32, vocab_size=120)
    folder = work["dir"] / "pickled"
    save_checkpoint(model, folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    res = cli("convert", work["prompt"], "-m", folder, "-o", work["dir"] / "p.st")
    assert_one_line_error(res, "only pickled .bin weights")
    assert "--allow-pickle" in res.stderr
    res = cli("convert", work["prompt"], "-m", folder, "-o", work["dir"] / "p.st", "--allow-pickle", "--json")
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize("model_type", ["evil_model", "iclca_linear"])
def test_code_in_a_checkpoint_is_never_run(cli, work, model_type):
    """A folder whose config points to its own modeling code: iclca never imports it."""
    marker = work["dir"] / "pwned"
    (work["model"] / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((work["model"] / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (work["model"] / "config.json").write_text(json.dumps(config))
    res = cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "p.st")
    if model_type == "evil_model":
        assert_one_line_error(res, "cannot load model")
    else:
        assert res.exit_code == 0, res.stderr  # the registered class is used, not the folder's code
    assert not marker.exists()


def test_patch_file_missing_or_not_safetensors(cli, work):
    assert_one_line_error(cli("inspect", work["dir"] / "none.st"), "patch file not found")
    (work["dir"] / "junk.st").write_bytes(b"\x89PNG\r\n" + bytes(range(256)))
    res = cli("eval", "-m", work["model"], "-p", work["dir"] / "junk.st", "--prompt", work["prompt"], "--queries", work["queries"])
    assert_one_line_error(res, "not a readable safetensors patch")


def test_patch_for_another_model_type(cli, work, gpt2_tokenizer):
    from helpers import make_gpt2_model

    gpt2 = work["dir"] / "gpt2"
    make_gpt2_model(51, torch.float32).save_pretrained(gpt2)
    gpt2_tokenizer.save_pretrained(gpt2)
    res = cli("eval", "-m", gpt2, "-p", work["patch"], "--prompt", work["prompt"], "--queries", work["queries"])
    assert_one_line_error(res, "is for a 'iclca_linear' model, this model is 'gpt2'")


def test_device_that_is_not_there(cli, work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "p.st", "--device", "cuda")
    assert_one_line_error(res, "--device cuda asked for, but this machine has no CUDA device")


def test_output_in_a_read_only_place(cli, work):
    """/proc refuses new files even to root: a real read-only location, not a simulated one."""
    assert_one_line_error(cli("convert", work["prompt"], "-m", work["model"], "-o", "/proc/patch.st"), "cannot write into /proc")
    assert_one_line_error(cli("merge", "-m", work["model"], "-p", work["patch"], "-o", "/proc/merged"), "cannot write into /proc")


# ---- fuzzing: whatever the input, the CLI ends with exit 0 or 2 and never a traceback ----------------------------

def assert_clean_exit(res, allowed=(0, 2)):
    assert res.exit_code in allowed, (res.exit_code, res.stderr[-500:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    if res.exit_code == 2:
        assert res.stderr.startswith("error: ") and "\nhint: " in res.stderr


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_as_a_patch(cli, work, data):
    path = work["dir"] / "fuzz.safetensors"
    path.write_bytes(data)
    assert_clean_exit(cli("inspect", path))
    assert_clean_exit(cli("eval", "-m", work["model"], "-p", path, "--prompt", work["prompt"], "--queries", work["queries"]))


@FUZZ
@given(text=st.one_of(st.text(max_size=400), st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=3000),
                      st.text(alphabet="\x00\x01\x1b\t\r\n \u2028\u200b:", max_size=50)))
def test_fuzz_random_text_as_a_prompt(cli, work, text):
    path = work["dir"] / "fuzz.txt"
    path.write_text(text, encoding="utf-8")
    res = cli("convert", path, "-m", work["model"], "-o", work["dir"] / "fuzz.st", "--json")
    assert_clean_exit(res)
    if res.exit_code == 0:
        assert one_json(res)["prompt_tokens"] >= 1


@FUZZ
@given(lines=st.lists(st.text(max_size=80), min_size=1, max_size=5), as_jsonl=st.booleans())
def test_fuzz_random_text_as_queries(cli, work, lines, as_jsonl):
    path = work["dir"] / ("fuzz.jsonl" if as_jsonl else "fuzz.txt")
    path.write_text("\n".join(json.dumps({"input": s, "target": s[::-1]}) if as_jsonl else s for s in lines), encoding="utf-8")
    assert_clean_exit(cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"], "--queries", path))


# ---- load -------------------------------------------------------------------------------------------------------

def test_load_100k_token_prompt_and_1000_queries(cli, tmp_path):
    """A demo-size linear model without a position table (demo-linear's has 256 rows) converts a
    100k-token prompt in chunks; eval runs 1,000 queries."""
    from iclca_demo.tasks import RecallTask
    from iclca_demo.word_tokenizer import build_word_tokenizer
    from helpers import ROOT

    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    tokenizer = build_word_tokenizer(task.words)
    model = make_linear_model(52, torch.float32, position_embedding_type="none", vocab_size=len(tokenizer),
                              hidden_size=128, num_attention_heads=4, initializer_range=0.02)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt = tmp_path / "long.txt"
    prompt.write_text("apple: 7\nriver: 3\n" * 16_667)  # 100,002 tokens
    res = cli("convert", prompt, "-m", folder, "-o", tmp_path / "long.st", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["prompt_tokens"] == 100_002
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"input": f"{k}:", "target": " 1"}) + "\n" for k in task.keys * 25))
    assert cli("convert", EXAMPLE_PROMPT, "-m", folder, "-o", tmp_path / "short.st").exit_code == 0
    res = cli("eval", "-m", folder, "-p", tmp_path / "short.st", "--prompt", EXAMPLE_PROMPT, "--queries", queries, "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert report["queries"] == 1000 and report["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("provenance", [None, "{not json", '{"iclca.method": "exact"}'], ids=["missing", "corrupt", "incomplete"])
def test_merged_folder_without_a_readable_provenance(cli, work, provenance):
    merged = work["dir"] / "merged"
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged).exit_code == 0
    if provenance is None:
        (merged / "iclca.json").unlink()
    else:
        (merged / "iclca.json").write_text(provenance)
    res = cli("eval", "-m", work["model"], "--merged", merged, "--prompt", work["prompt"], "--queries", work["queries"])
    assert_one_line_error(res, "no readable iclca.json")
