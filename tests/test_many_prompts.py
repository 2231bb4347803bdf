"""`iclca convert P1 P2 ... --out-dir DIR`: one model load and fingerprint for many prompts, each patch byte-identical
to converting its prompt alone, reruns that resume, bad prompts reported without stopping the rest; and the
fingerprint cache that makes the load cheap, never trusted across a change of the checkpoint's files."""

import json

import pytest
import torch

from helpers import assert_one_line_error, make_gpt2_model, make_recurrent, one_json, save_checkpoint
from iclca_cli import fingerprint as fp

PROMPTS = {"first": "alpha: one\nbeta: two\n", "second": "gamma: three\n", "third": "delta: four\nalpha: five\nbeta: six\n"}


def write_prompts(folder, prompts=PROMPTS):
    folder.mkdir(exist_ok=True)
    paths = []
    for stem, text in prompts.items():
        (folder / f"{stem}.txt").write_text(text)
        paths.append(folder / f"{stem}.txt")
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"lfm2": save_checkpoint(make_recurrent("lfm2", torch.float32, seed=3), root / "lfm2"),
            "gpt2": save_checkpoint(make_gpt2_model(seed=3, dtype=torch.float32, vocab_size=64), root / "gpt2")}


@pytest.mark.parametrize("model,options", [("demo-linear", []), ("lfm2", []), ("gpt2", ["--method", "compressed", "--budget", "2"])])
def test_each_patch_is_byte_identical_to_converting_its_prompt_alone(cli, tmp_path, checkpoints, model, options):
    model = str(checkpoints.get(model, model))
    paths = write_prompts(tmp_path / "prompts")
    res = cli("convert", *paths, "-m", model, "--out-dir", tmp_path / "many", *options, "--json")
    assert res.exit_code == 0, res.stderr
    report = one_json(res)
    assert (report["converted"], report["skipped"], report["failed"]) == (3, 0, 0)
    for p in paths:
        alone = tmp_path / f"{p.stem}-alone.safetensors"
        assert cli("convert", p, "-m", model, "-o", alone, *options).exit_code == 0
        assert (tmp_path / "many" / f"{p.stem}.safetensors").read_bytes() == alone.read_bytes()


def test_stacked_prompts_each_start_from_the_base_patch_alone(cli, tmp_path):
    """With --base-patch the base is applied to a copy per prompt: the second prompt is not stacked on the first."""
    paths = write_prompts(tmp_path / "prompts")
    assert cli("convert", paths[0], "-m", "demo-linear", "-o", tmp_path / "base.st").exit_code == 0
    res = cli("convert", *paths[1:], "-m", "demo-linear", "--base-patch", tmp_path / "base.st", "--out-dir", tmp_path / "many")
    assert res.exit_code == 0, res.stderr
    for p in paths[1:]:
        alone = tmp_path / f"{p.stem}-alone.st"
        assert cli("convert", p, "-m", "demo-linear", "--base-patch", tmp_path / "base.st", "-o", alone).exit_code == 0
        assert (tmp_path / "many" / f"{p.stem}.safetensors").read_bytes() == alone.read_bytes()


def test_a_rerun_keeps_identical_patches_and_redoes_the_others(cli, tmp_path):
    paths = write_prompts(tmp_path / "prompts")
    out = tmp_path / "many"
    assert cli("convert", *paths, "-m", "demo-gpt2", "--out-dir", out).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / "prompts/second.txt").write_text("gamma: six\n")  # a changed prompt: its old patch is replaced
    res = cli("convert", *paths, "-m", "demo-gpt2", "--out-dir", out, "--json")  # only with --force
    assert res.exit_code == 2 and [e["prompt"] for e in json.loads(res.stdout)["errors"]] == [str(paths[1])]
    assert "other provenance" in res.stderr and "--force" in res.stderr
    res = cli("convert", *paths, "-m", "demo-gpt2", "--out-dir", out, "--force", "--json")
    report = one_json(res)
    assert [r["status"] for r in report["patches"]] == ["skipped", "converted", "skipped"]
    for stem in ("first", "third"):  # not rewritten
        assert (out / f"{stem}.safetensors").stat().st_mtime_ns == stamps[f"{stem}.safetensors"]
    res = cli("convert", *paths, "-m", "demo-gpt2", "--out-dir", out, "--method", "compressed", "--budget", "2",
              "--force", "--json")
    assert [r["status"] for r in one_json(res)["patches"]] == ["converted"] * 3  # other provenance: not the same patch


def test_a_bad_prompt_is_reported_and_the_others_still_convert(cli, tmp_path):
    paths = write_prompts(tmp_path / "prompts", {"good": "alpha: one\n", "empty": "", "latin1": "x"})
    (tmp_path / "prompts/latin1.txt").write_bytes("caf\xe9: one\n".encode("latin-1"))
    res = cli("convert", *paths, "-m", "demo-linear", "--out-dir", tmp_path / "many", "--json")
    assert res.exit_code == 2
    report = json.loads(res.stdout)
    assert (report["converted"], report["failed"]) == (1, 2)
    assert [e["prompt"] for e in report["errors"]] == [str(paths[1]), str(paths[2])]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: 2 of 3 prompt files failed") and "empty.txt" in lines[0] \
        and "latin1.txt" in lines[0] and lines[1].startswith("hint: ") and "Traceback" not in res.stderr
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["good.safetensors"]


def test_outputs_that_are_missing_ambiguous_or_collide_are_refused(cli, tmp_path):
    paths = write_prompts(tmp_path / "prompts")
    assert_one_line_error(cli("convert", *paths, "-m", "demo-linear", "-o", tmp_path / "p.st"),
                          "--out names one patch, but 3 prompt files were given")
    assert_one_line_error(cli("convert", paths[0], "-m", "demo-linear"), "pass exactly one of --out and --out-dir")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/first.txt").write_text("beta: two\n")
    assert_one_line_error(cli("convert", paths[0], tmp_path / "other/first.txt", "-m", "demo-linear", "--out-dir",
                              tmp_path / "many"), "would both write first.safetensors")
    assert not (tmp_path / "many").exists()


def test_the_fingerprint_is_cached_per_folder_and_recomputed_when_a_file_changes(tmp_path, monkeypatch):
    from iclca_cli.loading import load_model

    folder = save_checkpoint(make_gpt2_model(seed=5, dtype=torch.float32, vocab_size=64), tmp_path / "m")
    monkeypatch.setenv("ICLCA_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = fp.model_fingerprint
    monkeypatch.setattr(fp, "model_fingerprint", lambda m: calls.append(1) or real(m))
    model, _ = load_model(str(folder))
    first = fp.folder_fingerprint(model, folder)
    assert first == real(model) and len(calls) == 1
    assert fp.folder_fingerprint(load_model(str(folder))[0], folder) == first and len(calls) == 1  # cached
    before = (folder / "model.safetensors").stat()
    make_gpt2_model(seed=6, dtype=torch.float32, vocab_size=64).save_pretrained(folder)  # other weights, same size
    assert (folder / "model.safetensors").stat().st_size == before.st_size
    model, _ = load_model(str(folder))
    assert fp.folder_fingerprint(model, folder) == real(model) != first and len(calls) == 2
    model64, _ = load_model(str(folder), "float64")  # another dtype is another key (bfloat16 would round weights)
    assert fp.folder_fingerprint(model64, folder) == real(model64) and len(calls) == 3
