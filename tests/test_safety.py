"""Nothing a user owns is lost, NaN never passes, a patch never meets another vocabulary: each case a careless or
hostile user tried (outputs over inputs, non-finite states, provenance holes, devices and FIFOs as prompts, data
that fakes messages) ends in a one-line error with exit code 2, or in correct output, with nothing partial left."""

import json
import os
import shutil
import stat
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, make_linear_model, one_json, tree_digest
from iclca_cli.errors import IclcaError, printable
from iclca_cli.loading import BUILTIN_DIR
from iclca_cli.patch import DIGEST, canonical_safetensors, load_patch, tensors_sha256


def snapshot(w):
    """Every byte of the inputs of the `work` fixture."""
    return {"model": tree_digest(w["model"]), **{k: w[k].read_bytes() for k in ("prompt", "queries", "patch")}}


def rewrite_patch(path, tensors=None, **meta_changes):
    """Write a patch file by hand (as a hostile or broken writer would): its tensors and metadata changed, the digest
    made to match the new tensors unless meta_changes sets it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = old if tensors is None else tensors
    meta = {**meta, DIGEST: tensors_sha256(tensors), **meta_changes}
    path.write_bytes(canonical_safetensors(tensors, {k: v for k, v in meta.items() if v is not None}))


# ---- outputs never replace, contain or sit inside inputs -------------------------------------------------------

def test_merge_into_the_current_folder_with_force_is_refused(cli, work, monkeypatch):
    before = snapshot(work)
    monkeypatch.chdir(work["dir"])
    assert_one_line_error(cli("merge", "-m", "model", "-p", "patch.safetensors", "-o", ".", "--force"),
                          "--out . contains the model folder")
    assert snapshot(work) == before


@pytest.mark.parametrize("args,fragment", [
    (("merge", "-m", "{model}", "-p", "{patch}", "-o", "{model}", "--force"), "is the model folder"),
    (("export-peft", "-m", "{model}", "-p", "{patch}", "-o", "{model}", "--force"), "is the model folder"),
    (("merge", "-m", "{model}", "-p", "{patch}", "-o", "{model}/sub", "--force"), "lies inside the model folder"),
    (("convert", "{prompt}", "-m", "{model}", "-o", "{model}/model.safetensors"), "lies inside the model folder"),
    (("convert", "{prompt}", "-m", "{model}", "--out-dir", "{model}"), "--out-dir {model} is the model folder"),
    (("convert", "{prompt}", "-m", "{model}", "-o", "{prompt}"), "is the prompt file"),
    (("convert", "{prompt}", "-m", "{model}", "-o", "{patch}", "--base-patch", "{patch}"), "is the base patch"),
    (("convert", "{prompt}", "-m", "{model}", "--out-dir", "{dir}", "--base-patch", "{dir}/prompt.safetensors"),
     "is the base patch"),
    (("merge", "-m", "{model}", "-p", "{patch}", "-o", "{patch}", "--force"), "is the patch"),
], ids=["merge-over-model", "peft-over-model", "merge-inside-model", "convert-over-weights", "out-dir-is-model",
        "convert-over-prompt", "convert-over-base-patch", "out-dir-over-base-patch", "merge-over-patch"])
def test_an_output_over_an_input_is_refused(cli, work, args, fragment):
    if "{dir}/prompt.safetensors" in args:
        shutil.copy(work["patch"], work["dir"] / "prompt.safetensors")
        work["patch"] = work["dir"] / "prompt.safetensors"
    before = snapshot(work)
    fill = {k: str(work[k]) for k in ("model", "patch", "prompt", "dir")}
    assert_one_line_error(cli(*(a.format(**fill) for a in args)), fragment.format(**fill))
    assert snapshot(work) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["a", "b", ".", ".."]), min_size=1, max_size=4),
       st.lists(st.sampled_from(["a", "b", ".", ".."]), min_size=1, max_size=4))
def test_check_apart_refuses_exactly_the_paths_that_overlap(tmp_path, out_parts, in_parts):
    """Any two paths (relative, with . and ..): refused iff, resolved, one is the other or lies inside it."""
    from iclca_cli.outputs import check_apart

    root = tmp_path.resolve() / "x" / "y"  # room for .. to climb
    out, inp = root.joinpath(*out_parts), root.joinpath(*in_parts)
    o, i = os.path.normpath(out), os.path.normpath(inp)  # by string, not as check_apart does it
    overlap = o == i or o.startswith(i + os.sep) or i.startswith(o + os.sep)
    try:
        check_apart(out, [("input", inp)])
        refused = False
    except IclcaError:
        refused = True
    assert refused == overlap


def test_a_symlink_to_an_input_is_the_input(cli, work):
    link = work["dir"] / "link.safetensors"
    link.symlink_to(work["prompt"])
    before = snapshot(work)
    assert_one_line_error(cli("convert", work["prompt"], "-m", work["model"], "-o", link), "is the prompt file")
    assert snapshot(work) == before


def test_a_file_iclca_did_not_write_is_never_replaced(cli, work):
    notes = work["dir"] / "out" / "notes.safetensors"
    notes.parent.mkdir()
    notes.write_text("my notes")
    shutil.copy(work["prompt"], work["dir"] / "notes.txt")
    for extra in ((), ("--force",)):
        assert_one_line_error(cli("convert", work["dir"] / "notes.txt", "-m", work["model"], "--out-dir", notes.parent,
                                  *extra), "notes.safetensors exists and is not an iclca patch")
        assert_one_line_error(cli("convert", work["prompt"], "-m", work["model"], "-o", notes, *extra),
                              "is not an iclca patch")
    assert notes.read_text() == "my notes"


def test_force_replaces_only_a_folder_iclca_wrote(cli, work):
    mine = work["dir"] / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for command in ("merge", "export-peft"):
        assert_one_line_error(cli(command, "-m", work["model"], "-p", work["patch"], "-o", mine, "--force"),
                              "was not written by iclca")
    assert (mine / "thesis.tex").read_text() == "years of work"
    merged = work["dir"] / "merged"
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged).exit_code == 0
    assert_one_line_error(cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged), "already exists")
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged, "--force").exit_code == 0


def test_another_patch_at_the_output_needs_force(cli, work):
    other = work["dir"] / "other.txt"
    other.write_text("apple: 1\nriver: 2\n")
    before = work["patch"].read_bytes()
    assert_one_line_error(cli("convert", other, "-m", work["model"], "-o", work["patch"]), "other provenance")
    assert work["patch"].read_bytes() == before
    assert cli("convert", other, "-m", work["model"], "-o", work["patch"], "--force").exit_code == 0
    from iclca_cli.convert import sha256_text

    assert load_patch(work["patch"]).prompt_sha256 == sha256_text(other.read_text())
    # the same conversion again is kept as it is, without --force
    assert cli("convert", other, "-m", work["model"], "-o", work["patch"]).exit_code == 0


def test_a_trailing_slash_means_a_folder(cli, work):
    res = cli("convert", work["prompt"], "-m", work["model"], "-o", f"{work['dir'] / 'newname'}/")
    assert_one_line_error(res, "names a folder")
    assert not (work["dir"] / "newname").exists()


def test_a_replace_killed_between_its_renames_is_repaired_by_the_next_run(cli, work):
    merged = work["dir"] / "merged"
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged).exit_code == 0
    before = tree_digest(merged)
    aside = work["dir"] / ".merged.old-.merged.tmp-x1"  # as move_into_place leaves it after its first rename
    merged.rename(aside)
    res = cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged)
    warning, error, hint = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and "moved aside by a run that was interrupted; it is back" in warning
    assert "already exists" in error and hint.startswith("hint: ")  # the old folder is back: --force is needed again
    assert tree_digest(merged) == before and not aside.exists()
    shutil.copytree(merged, aside)  # killed after the second rename: the new one is in place, the old one aside
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged, "--force").exit_code == 0
    assert not aside.exists() and tree_digest(merged) == before


def test_files_and_folders_follow_the_umask(cli, work):
    old = os.umask(0o022)
    try:
        assert cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "u.st").exit_code == 0
        assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", work["dir"] / "m").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((work["dir"] / "u.st").stat().st_mode) == 0o644
    assert stat.S_IMODE((work["dir"] / "m").stat().st_mode) == 0o755


# ---- finite or refused -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_patch_is_refused_by_merge_eval_and_apply(cli, work, value):
    from iclca_cli.patch import apply_patch

    patch = load_patch(work["patch"])
    tensors = {k: torch.full_like(t, value) if i == 0 else t for i, (k, t) in enumerate(sorted(patch.tensors.items()))}
    rewrite_patch(work["patch"], tensors)
    assert cli("inspect", work["patch"], "--json").exit_code == 0  # inspect shows it, and counts the bad values
    assert one_json(cli("inspect", work["patch"], "--json"))["nonfinite_values"] > 0
    assert_one_line_error(cli("merge", "-m", work["model"], "-p", work["patch"], "-o", work["dir"] / "m"),
                          "non-finite values")
    assert not (work["dir"] / "m").exists()
    assert_one_line_error(cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"],
                              "--queries", work["queries"], "--max-abs-logit-diff", "1e-4"), "non-finite values")
    with pytest.raises(IclcaError, match="non-finite"):
        apply_patch(make_linear_model(), load_patch(work["patch"]))


def test_nan_logits_fail_every_gate(cli, work):
    """A merged folder whose buffers were damaged to NaN: eval reports the NaN (null in JSON) and exits 1."""
    from safetensors.torch import load_file, save_file

    merged = work["dir"] / "merged"
    assert cli("merge", "-m", work["model"], "-p", work["patch"], "-o", merged).exit_code == 0
    weights = load_file(merged / "model.safetensors")
    name = next(k for k in weights if k.endswith("memory_kv"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    base = ("eval", "-m", work["model"], "--merged", merged, "--prompt", work["prompt"], "--queries", work["queries"],
            "--json")
    for gate in (("--max-abs-logit-diff", "1e-4"), ("--min-top1-agreement", "0"), ("--max-abs-logit-diff", "1e9")):
        res = cli(*base, *gate)
        assert res.exit_code == 1, res.stderr
        report = one_json(res)
        assert report["max_abs_logit_diff"] is None and report["nonfinite_positions"]["patched"] > 0
        assert "NaN or Inf" in res.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_thresholds_must_be_finite(cli, work, value):
    res = cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"], "--queries",
              work["queries"], "--max-abs-logit-diff", value)
    assert_one_line_error(res, "--max-abs-logit-diff")


def test_float16_overflow_is_refused_at_convert():
    """A linear model's memories are sums over the prompt: in float16 they overflow on long prompts."""
    from helpers import convert, random_ids

    model = make_linear_model(3, torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_attn" in name or "wte" in name:
                p.mul_(30)
    with pytest.raises(IclcaError, match="non-finite") as e:
        convert(model, random_ids(600))
    assert "--dtype bfloat16" in e.value.hint


# ---- provenance ------------------------------------------------------------------------------------------------

def test_a_patch_never_meets_another_vocabulary(cli, work):
    """The same weights and config, a tokenizer that maps two words to each other's ids: refused."""
    other = work["dir"] / "other"
    shutil.copytree(work["model"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "apple", "river"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    for command in (("merge", "-o", work["dir"] / "m"), ("eval", "--prompt", work["prompt"], "--queries", work["queries"])):
        res = cli(command[0], "-m", other, "-p", work["patch"], *command[1:])
        assert_one_line_error(res, "was made for model", "tokenizer")
    assert not (work["dir"] / "m").exists()


def test_a_checkpoint_without_tokenizer_files_is_refused(cli, work):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work["model"] / name).unlink()
    gpt2 = work["dir"] / "gpt2"
    shutil.copytree(BUILTIN_DIR / "demo-gpt2", gpt2, ignore=shutil.ignore_patterns("tokenizer*"))
    for model in (work["model"], gpt2):  # gpt2: transformers makes up a tokenizer with one special token
        res = cli("convert", work["prompt"], "-m", model, "-o", work["dir"] / "p.st")
        assert_one_line_error(res)
        assert "tokenizer" in res.stderr


@pytest.mark.parametrize("changes,fragment", [
    ({"iclca.position_offset": "3"}, "position_offset 3"),
    ({"iclca.prompt_tokens": "0", "iclca.position_offset": "0"}, "prompt_tokens 0"),
    ({"iclca.prompt_tokens": "-4"}, "non-integer"),
    ({"iclca.dtype": "int8"}, "iclca.dtype"),
    ({"iclca.base_fingerprint": "abc\n"}, "not a sha256"),
    ({DIGEST: "0" * 64}, "do not match the digest"),
], ids=["offset", "zero-tokens", "negative", "dtype", "fingerprint", "digest"])
def test_inconsistent_metadata_is_refused(cli, work, changes, fragment):
    rewrite_patch(work["patch"], **changes)
    assert_one_line_error(cli("merge", "-m", work["model"], "-p", work["patch"], "-o", work["dir"] / "m"), fragment)


def test_eval_and_generate_compare_refuse_a_prompt_other_than_the_patch_s(cli, work):
    """The prompted model of a report must read the prompt the patch holds: another prompt file (or the right one
    read without the --chat the patch was made with) is refused before any model runs, for a patch and for its merged
    folder; the right one passes."""
    w = work
    other = w["dir"] / "other.txt"
    other.write_text(w["prompt"].read_text() + "one more line\n")
    merged = w["dir"] / "merged"
    assert cli("merge", "-m", w["model"], "--patch", w["patch"], "-o", merged).exit_code == 0
    for source in (("--patch", w["patch"]), ("--merged", merged)):
        res = cli("eval", "-m", w["model"], *source, "--prompt", other, "--queries", w["queries"])
        assert_one_line_error(res, f"{other} is not the prompt", "made from")
        res = cli("generate", "-m", w["model"], *source, "--prompt", other, "--compare", "hello")
        assert_one_line_error(res, f"{other} is not the prompt")
        assert cli("eval", "-m", w["model"], *source, "--prompt", w["prompt"], "--queries", w["queries"]).exit_code == 0


def test_a_patch_that_lost_tensors_is_refused(cli, work):
    patch = load_patch(work["patch"])
    rewrite_patch(work["patch"], dict(sorted(patch.tensors.items())[:1]))
    assert_one_line_error(cli("merge", "-m", work["model"], "-p", work["patch"], "-o", work["dir"] / "m"), "lacks tensor")


@pytest.mark.parametrize("damage", ["nan", "one-of-four", "digest-dropped"])
def test_a_batch_rerun_keeps_a_patch_only_if_its_data_verifies(cli, work, damage):
    out = work["dir"] / "out"
    args = ("convert", work["prompt"], "-m", work["model"], "--out-dir", out, "--json")
    assert one_json(cli(*args))["converted"] == 1
    target = out / "prompt.safetensors"
    good = target.read_bytes()
    assert one_json(cli(*args))["skipped"] == 1
    tensors = load_patch(target).tensors
    with_header = {DIGEST: None} if damage == "digest-dropped" else {DIGEST: tensors_sha256(tensors)}
    if damage == "nan":
        tensors = {k: torch.full_like(t, float("nan")) for k, t in tensors.items()}
    elif damage == "one-of-four":
        tensors = dict(sorted(tensors.items())[:1])
    rewrite_patch(target, tensors, **with_header)  # the metadata as it was: only the data changed
    report = one_json(cli(*args))
    assert report["converted"] == 1 and report["skipped"] == 0
    assert target.read_bytes() == good


def test_a_patch_from_before_the_tokenizer_fingerprint_is_checked_the_old_way(cli, work):
    from iclca_cli.fingerprint import model_fingerprint
    from iclca_cli.loading import load_model

    model = load_model(str(work["model"]))[0]
    rewrite_patch(work["patch"], **{"iclca.base_fingerprint": model_fingerprint(model), "iclca.fingerprint_covers": None})
    res = cli("merge", "-m", work["model"], "-p", work["patch"], "-o", work["dir"] / "m")
    assert res.exit_code == 0, res.stderr
    assert "warning: " in res.stderr and "tokenizer is not checked" in res.stderr


def test_a_local_folder_wins_over_a_built_in_name(cli, work, monkeypatch):
    monkeypatch.chdir(work["dir"])
    shutil.copytree(BUILTIN_DIR / "demo-lfm2", work["dir"] / "demo-linear")
    res = cli("convert", work["prompt"], "-m", "demo-linear", "-o", work["dir"] / "p.st", "--json")
    assert res.exit_code == 0, res.stderr
    assert load_patch(work["dir"] / "p.st").model_type == "lfm2"
    assert "warning: demo-linear is both a local path and a built-in model name" in res.stderr


def test_an_unknown_name_fails_at_once_with_a_suggestion(cli, work):
    t0 = time.perf_counter()
    assert_one_line_error(cli("convert", work["prompt"], "-m", "demo-linera", "-o", work["dir"] / "p.st"))
    assert time.perf_counter() - t0 < 10


def test_a_hub_id_offline_fails_at_once(cli, work, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("convert", work["prompt"], "-m", "someorg/some-model-iclca-never-saw", "-o", work["dir"] / "p.st")
    assert_one_line_error(res, "hub cannot be reached")


# ---- inputs ----------------------------------------------------------------------------------------------------

def test_devices_and_fifos_are_not_prompts_and_a_batch_converts_the_rest(cli, work):
    zero, fifo = work["dir"] / "zero.txt", work["dir"] / "fifo.txt"
    zero.symlink_to("/dev/zero")
    os.mkfifo(fifo)
    assert_one_line_error(cli("convert", zero, "-m", work["model"], "-o", work["dir"] / "z.st"), "not a regular file")
    assert_one_line_error(cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"],
                              "--queries", fifo), "not a regular file")
    res = cli("convert", zero, fifo, work["prompt"], "-m", work["model"], "--out-dir", work["dir"] / "out", "--json")
    assert res.exit_code == 2
    report = json.loads(res.stdout)
    assert report["converted"] == 1 and report["failed"] == 2
    assert (work["dir"] / "out" / "prompt.safetensors").is_file()


def test_inputs_past_the_size_limit_need_the_flag(cli, work):
    big = work["dir"] / "big.txt"
    big.write_text("apple: 7\n" * 130_000)  # 1.1 MiB
    assert_one_line_error(cli("convert", big, "-m", work["model"], "-o", work["dir"] / "b.st", "--max-input-mib", "1"),
                          "larger than 1 MiB")
    assert_one_line_error(cli("eval", "-m", work["model"], "-p", work["patch"], "--prompt", work["prompt"],
                              "--queries", big, "--max-input-mib", "1"), "larger than 1 MiB")


def test_a_full_disk_fails_one_prompt_of_a_batch_and_leaves_no_temp_file(cli, work, monkeypatch):
    import errno

    import iclca_cli.outputs as outputs

    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("full.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    full = work["dir"] / "full.txt"
    full.write_text("apple: 1\n")
    out = work["dir"] / "out"
    res = cli("convert", full, work["prompt"], "-m", work["model"], "--out-dir", out, "--json")
    assert res.exit_code == 2
    report = json.loads(res.stdout)
    assert report["converted"] == 1 and "No space left on device" in report["errors"][0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["prompt.safetensors"]


# ---- messages --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (("--method", "compressed", "--budget", "-1"), "--budget"),
    (("--budget", "abc", "--method", "evict"), "--budget"),
    (("--dtype", "bogus"), "--dtype"),
    (("--chunk-size", "0"), "--chunk-size"),
    (("--method", "taylor", "--order", "3"), "--order"),
    (("--method", "bogus"), "--method"),
    (("--frobnicate",), "--frobnicate"),
    (("--budget", "4"), "--budget applies to --method compressed or evict"),
    (("--method", "exact", "--order", "1"), "--order applies to --method taylor"),
    (("--split", "layers"), "--split applies to --method compressed"),
    (("--device-map", "auto", "--device", "cuda"), "--device cuda and --device-map auto"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_every_bad_option_value_is_one_error_and_a_hint(cli, work, flags, fragment):
    res = cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "p.st", *flags)
    assert_one_line_error(res, fragment)
    assert not (work["dir"] / "p.st").exists()


def test_a_newline_in_a_path_cannot_fake_a_line(cli, work):
    res = cli("convert", work["dir"] / "a\nhint: all is well\x1b[2J.txt", "-m", work["model"], "-o", work["dir"] / "p.st")
    assert_one_line_error(res, "\\nhint: all is well\\x1b[2J.txt")


def test_inspect_shows_metadata_as_text_and_stays_fast_on_huge_values(cli, work, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # a wide terminal: each value on one line
    huge = "x" * (20 << 20)
    rewrite_patch(work["patch"], **{"iclca.note": "[bold red]FAKE: verified[/bold red] [/oops] \x1b[31mred\nhint: x",
                                    "iclca.huge": huge})
    t0 = time.perf_counter()
    res = cli("inspect", work["patch"])
    assert res.exit_code == 0, res.stderr
    assert time.perf_counter() - t0 < 30
    assert "[bold red]FAKE: verified[/bold red] [/oops] \\x1b[31mred\\nhint: x" in res.stdout
    assert "\x1b" not in res.stdout and "more characters" in res.stdout and len(res.stdout) < 100_000
    assert one_json(cli("inspect", work["patch"], "--json"))["iclca.huge"] == huge


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_printable_is_one_line_without_control_characters(text):
    shown = printable(text)
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert shown.isprintable() or set(shown) - set(filter(str.isprintable, shown)) <= {" "}
    assert printable(shown) == shown  # what is shown prints as itself


# ---- the fingerprint cache and the dependencies ----------------------------------------------------------------

@pytest.mark.parametrize("garbage", ["nested", "folder", "binary"])
def test_a_damaged_fingerprint_cache_is_rebuilt_and_leaves_no_temp_files(cli, work, tmp_path, monkeypatch, garbage):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("ICLCA_CACHE_DIR", str(cache))
    store = cache / "fingerprints.json"
    if garbage == "nested":
        store.write_text("[" * 100_000 + "]" * 100_000)
    elif garbage == "folder":
        store.mkdir()
    else:
        store.write_bytes(bytes(range(256)))
    assert cli("convert", work["prompt"], "-m", work["model"], "-o", tmp_path / "p.st").exit_code == 0
    assert load_patch(tmp_path / "p.st").base_fingerprint == load_patch(work["patch"]).base_fingerprint
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_accelerate_is_a_declared_dependency():
    import tomllib

    from helpers import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("accelerate") for d in deps)


def test_a_missing_package_gets_its_own_hint(cli, work, monkeypatch):
    import transformers

    def missing(*args, **kwargs):
        raise ImportError("this needs accelerate", name="accelerate")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    res = cli("convert", work["prompt"], "-m", work["model"], "-o", work["dir"] / "p.st")
    assert_one_line_error(res, "needs accelerate")
    assert "hint: pip install accelerate" in res.stderr
