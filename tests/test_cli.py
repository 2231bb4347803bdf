"""The command line: convert -> inspect -> merge -> eval on the built-in model, JSON output, exit codes, errors."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from helpers import (EXAMPLE_PROMPT, EXAMPLE_QUERIES, assert_one_line_error, make_linear_model, one_json,
                     save_checkpoint, tree_digest)
from iclca_cli.loading import BUILTIN_DIR

EVAL_KEYS = {"queries", "prompt_tokens", "method", "max_abs_logit_diff", "kl_prompted_patched", "kl_prompted_base",
             "top1_agreement", "accuracy", "timing", "sizes"}


@pytest.fixture(scope="module")
def demo_patch(tmp_path_factory):
    """A float64 patch of the example prompt on demo-linear, made through the CLI."""
    from typer.testing import CliRunner

    from iclca_cli.cli import app

    path = tmp_path_factory.mktemp("patch") / "recall.safetensors"
    res = CliRunner().invoke(app, ["convert", str(EXAMPLE_PROMPT), "--model", "demo-linear", "--out", str(path),
                                   "--dtype", "float64", "--json"])
    assert res.exit_code == 0, res.stderr
    return path


def test_convert_reports_one_json_object_and_writes_the_patch(cli, tmp_path, demo_patch):
    before = tree_digest(BUILTIN_DIR / "demo-linear")
    res = cli("convert", EXAMPLE_PROMPT, "--model", "demo-linear", "--out", tmp_path / "p.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    info = one_json(res)
    assert info["method"] == "exact" and info["prompt_tokens"] == info["position_offset"] == 24
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata()["iclca.prompt_tokens"] == "24" and f.metadata()["iclca.dtype"] == "float32"
    assert tree_digest(BUILTIN_DIR / "demo-linear") == before  # the source checkpoint is untouched


def test_convert_twice_gives_byte_identical_patches(cli, tmp_path):
    for name in ("a", "b"):
        assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-linear", "-o", tmp_path / f"{name}.safetensors").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_eval_patch_and_merged_are_exact_in_float64(cli, tmp_path, demo_patch):
    res = cli("eval", "--model", "demo-linear", "--patch", demo_patch, "--prompt", EXAMPLE_PROMPT,
              "--queries", EXAMPLE_QUERIES, "--dtype", "float64", "--max-abs-logit-diff", "1e-10", "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert EVAL_KEYS <= set(report)
    assert report["queries"] == 6 and report["prompt_tokens"] == 24 and report["method"] == "exact"
    assert report["max_abs_logit_diff"] <= 1e-10 and report["top1_agreement"] == 1.0
    assert report["kl_prompted_patched"] <= 1e-12 < report["kl_prompted_base"]
    assert report["accuracy"]["patched"] == report["accuracy"]["prompted"] == 1.0  # the trained demo answers
    assert report["accuracy"]["base"] <= 0.5  # ... which, without the prompt, it cannot know
    assert set(report["timing"]) == {"prompted_s", "patched_s"}
    assert report["sizes"] == {"patch_bytes": 2 * (4 * 32 * 32 + 4 * 32) * 8, "prompt_kv_bytes": 2 * 2 * 24 * 128 * 8}

    merged = tmp_path / "merged"
    res = cli("merge", "--model", "demo-linear", "--patch", demo_patch, "--out", merged, "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["merged"] == str(merged)
    res = cli("eval", "--model", "demo-linear", "--merged", merged, "--prompt", EXAMPLE_PROMPT,
              "--queries", EXAMPLE_QUERIES, "--dtype", "float64", "--json")
    assert res.exit_code == 0, res.stderr
    report_merged = one_json(res)
    assert report_merged["max_abs_logit_diff"] <= 1e-10 and report_merged["accuracy"]["patched"] == 1.0
    assert report_merged["sizes"] == report["sizes"]


def test_eval_exits_1_when_a_threshold_is_missed(cli, tmp_path):
    """An approximate patch (a summary of two entries per head) misses a fidelity threshold."""
    patch = tmp_path / "c.st"
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "-o", patch, "--method", "compressed", "--budget", "2").exit_code == 0
    res = cli("eval", "-m", "demo-gpt2", "-p", patch, "--prompt", EXAMPLE_PROMPT, "--queries", EXAMPLE_QUERIES,
              "--max-abs-logit-diff", "1e-3", "--json")
    assert res.exit_code == 1
    assert one_json(res)["max_abs_logit_diff"] > 1e-3
    assert "check failed: max_abs_logit_diff" in res.stderr


def test_inspect_shows_fingerprint_and_tensors(cli, demo_patch):
    res = cli("inspect", demo_patch, "--json")
    assert res.exit_code == 0
    info = one_json(res)
    assert len(info["iclca.base_fingerprint"]) == 64 and info["iclca.method"] == "exact"
    assert info["tensors"]["transformer.h.0.attn.memory_kv"] == [[4, 32, 32], "float64"]
    assert info["patch_bytes_by_part"] == {"recurrent": info["patch_bytes"], "attention": 0}


def test_stacking_through_the_cli(cli, tmp_path):
    a, b, ab = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "ab.txt"
    a.write_text("apple: 7\nriver: 3\n")
    b.write_text("stone: 9\ncloud: 1\n")
    ab.write_text(a.read_text() + b.read_text())
    for args in (("a", a), ("ab", ab)):
        assert cli("convert", args[1], "-m", "demo-linear", "-o", tmp_path / f"{args[0]}.st", "--dtype", "float64").exit_code == 0
    res = cli("convert", b, "-m", "demo-linear", "-o", tmp_path / "stacked.st", "--base-patch", tmp_path / "a.st",
              "--dtype", "float64", "--json")
    assert res.exit_code == 0, res.stderr
    assert one_json(res)["position_offset"] == 12  # both prompts, 6 tokens each
    with safe_open(str(tmp_path / "stacked.st"), "pt") as s, safe_open(str(tmp_path / "ab.st"), "pt") as j:
        for name in j.keys():
            assert (s.get_tensor(name) - j.get_tensor(name)).abs().max() <= 1e-10


# ---- bad input: one-line error with a hint, exit 2, nothing written --------------------------------------------


def test_missing_prompt_file(cli, tmp_path):
    res = cli("convert", tmp_path / "nope.txt", "-m", "demo-linear", "-o", tmp_path / "p.st")
    assert_one_line_error(res, "prompt file not found")
    assert not (tmp_path / "p.st").exists()


@pytest.mark.parametrize("content", ["", "  \n\n "], ids=["empty", "whitespace"])
def test_empty_prompt(cli, tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    assert_one_line_error(cli("convert", tmp_path / "empty.txt", "-m", "demo-linear", "-o", tmp_path / "p.st"), "is empty")


def test_prompt_that_is_not_utf8(cli, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("pomme: 7\nrivière: 3\n".encode("latin-1"))
    assert_one_line_error(cli("convert", tmp_path / "latin1.txt", "-m", "demo-linear", "-o", tmp_path / "p.st"), "not UTF-8")


def test_prompt_longer_than_the_positions(cli, tmp_path):
    (tmp_path / "long.txt").write_text("apple: 7\n" * 100)  # 300 tokens, the model has 256 positions
    res = cli("convert", tmp_path / "long.txt", "-m", "demo-linear", "-o", tmp_path / "p.st")
    assert_one_line_error(res, "the prompt and at least one query token needs 301 positions but the model has 256")


def test_patch_for_another_model(cli, tmp_path, demo_patch):
    other = save_checkpoint(make_linear_model(40, vocab_size=120, hidden_size=128), tmp_path / "other")
    res = cli("eval", "-m", other, "-p", demo_patch, "--prompt", EXAMPLE_PROMPT, "--queries", EXAMPLE_QUERIES)
    assert_one_line_error(res, "was made for model")
    res = cli("merge", "-m", other, "-p", demo_patch, "-o", tmp_path / "m")
    assert_one_line_error(res, "was made for model")
    assert not (tmp_path / "m").exists()


def test_truncated_patch(cli, tmp_path, demo_patch):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(demo_patch.read_bytes()[:1000])
    assert_one_line_error(cli("inspect", bad), "not a readable safetensors patch")


def test_missing_model_folder_and_missing_config(cli, tmp_path):
    assert_one_line_error(cli("convert", EXAMPLE_PROMPT, "-m", tmp_path / "none", "-o", tmp_path / "p.st"), "model folder not found")
    (tmp_path / "empty-model").mkdir()
    assert_one_line_error(cli("convert", EXAMPLE_PROMPT, "-m", tmp_path / "empty-model", "-o", tmp_path / "p.st"), "no config.json")


def test_existing_merge_output_needs_force(cli, tmp_path, demo_patch):
    assert cli("merge", "-m", "demo-linear", "-p", demo_patch, "-o", tmp_path / "out").exit_code == 0
    assert_one_line_error(cli("merge", "-m", "demo-linear", "-p", demo_patch, "-o", tmp_path / "out"), "already exists")
    assert cli("merge", "-m", "demo-linear", "-p", demo_patch, "-o", tmp_path / "out", "--force").exit_code == 0


def test_output_folder_that_does_not_exist(cli, tmp_path):
    res = cli("convert", EXAMPLE_PROMPT, "-m", "demo-linear", "-o", tmp_path / "no/such/dir/p.st")
    assert_one_line_error(res, "output folder does not exist")


def test_eval_needs_exactly_one_of_patch_and_merged(cli, demo_patch):
    res = cli("eval", "-m", "demo-linear", "--prompt", EXAMPLE_PROMPT, "--queries", EXAMPLE_QUERIES)
    assert_one_line_error(res, "exactly one of --patch and --merged")


def test_malformed_queries(cli, tmp_path, demo_patch):
    (tmp_path / "q.jsonl").write_text('{"input": "river:"}\n{"target": " 3"}\n')
    res = cli("eval", "-m", "demo-linear", "-p", demo_patch, "--prompt", EXAMPLE_PROMPT, "--queries", tmp_path / "q.jsonl")
    assert_one_line_error(res, 'line 2 has no string "input"')


def test_unsupported_dtype_is_a_usage_error(cli, tmp_path):
    res = cli("convert", EXAMPLE_PROMPT, "-m", "demo-linear", "-o", tmp_path / "p.st", "--dtype", "int8")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_console_script_runs_and_keeps_streams_apart(tmp_path):
    """The installed `iclca` entry point: result on stdout, nothing else there."""
    proc = subprocess.run([sys.executable, "-m", "iclca_cli.cli", "convert", str(EXAMPLE_PROMPT), "-m", "demo-linear",
                           "-o", str(tmp_path / "p.st"), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] == 24


def test_the_python_api_page_runs(tmp_path, monkeypatch):
    """docs/python-api.md's first example, as written, in a fresh folder holding the example prompt and queries."""
    import re
    import shutil

    from helpers import ROOT

    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs/python-api.md").read_text(), re.S)[0]
    shutil.copytree(ROOT / "configs/examples", tmp_path / "configs/examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {})
    assert (tmp_path / "recall-merged/iclca.json").is_file() and (tmp_path / "compressed.safetensors").is_file()
