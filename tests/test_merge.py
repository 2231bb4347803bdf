"""Merged folders: exact, loadable both ways (fresh process with plain transformers, and iclca), and safe to write."""

import json

import pytest
import torch

from helpers import (convert, greedy, logits, make_linear_model, random_ids, run_fresh_process, save_checkpoint,
                     tree_digest)
from iclca_cli.errors import IclcaError
from iclca_cli.families import family_named
from iclca_cli.loading import load_model
from iclca_cli.merge import merge_patch, read_provenance
from iclca_cli.models.merged import modeling_file

CASES = [(30, "elu+1", "learned", 120, 16), (31, "relu", "none", 300, 8), (32, "relu", "learned", 1, 30),
         (33, "elu+1", "none", 64, 1)]


def test_merged_folder_in_a_fresh_process_equals_prompted(tmp_path):
    """Golden test for merge, float64 (≤ 1e-10) and float32 (≤ 1e-4), both feature maps and position types,
    16 greedy tokens."""
    cases, expected = [], []
    for seed, fm, pos, P, Q in CASES:
        for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            model = make_linear_model(seed, dtype, fm, pos)
            prompt, query = random_ids(P, seed=seed), random_ids(Q, seed=seed + 1)
            base = save_checkpoint(model, tmp_path / f"base-{seed}-{dtype}")
            m, tok = load_model(str(base), str(dtype).removeprefix("torch."))
            _, patch = convert(m, prompt, chunk_size=50)
            folder = merge_patch(m, tok, patch, tmp_path / f"merged-{seed}-{dtype}")
            cases.append({"folder": str(folder), "dtype": str(dtype).removeprefix("torch."), "query": query})
            expected.append((logits(model, prompt + query)[P:], greedy(model, prompt + query, 16), bound))
    results = run_fresh_process(cases, tmp_path)
    for res, (want, want_gen, bound), case in zip(results, expected, cases):
        assert res["class"].startswith("transformers_modules.") and not res["iclca_imported"]
        got = torch.tensor(res["logits"], dtype=want.dtype)
        assert (got - want).abs().max().item() <= bound, case
        assert res["generated"] == want_gen, case


def test_merged_folder_loads_through_iclca_without_remote_code(tmp_path):
    model = make_linear_model(34)
    prompt, query = random_ids(50, seed=34), random_ids(10, seed=35)
    base = save_checkpoint(model, tmp_path / "base")
    m, tok = load_model(str(base), "float64")
    _, patch = convert(m, prompt)
    folder = merge_patch(m, tok, patch, tmp_path / "merged")
    merged, _ = load_model(str(folder), "float64")  # trust_remote_code=False: the registered class is used
    assert type(merged).__module__ == "iclca_cli.models.modeling_iclca_linear"
    assert merged.config.position_offset == 50
    assert (logits(merged, query) - logits(model, prompt + query)[50:]).abs().max() <= 1e-10
    assert read_provenance(folder)["iclca.position_offset"] == "50"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_iclca_linear.IclcaLinearForCausalLM"
    carried = (folder / "modeling_iclca_linear.py").read_text()  # the model file with the ops it imports, inlined
    assert carried == modeling_file(family_named("iclca_linear"))[1] and "def linear_attention_chunked" in carried
    assert not any(line.startswith(("import iclca", "from iclca", "from .")) for line in carried.splitlines())


def _merge_setup(tmp_path, seed=36):
    model = make_linear_model(seed)
    base = save_checkpoint(model, tmp_path / "base")
    m, tok = load_model(str(base), "float64")
    _, patch = convert(m, random_ids(20, seed=seed))
    return base, m, tok, patch


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    base, m, tok, patch = _merge_setup(tmp_path)
    out = tmp_path / "out"
    merge_patch(m, tok, patch, out)  # --force replaces only a folder iclca wrote
    (out / "keep.txt").write_text("mine")
    with pytest.raises(IclcaError, match="already exists"):
        merge_patch(m, tok, patch, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_patch(m, tok, patch, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no temporary or old folder left


def test_a_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    base, m, tok, patch = _merge_setup(tmp_path)
    before = tree_digest(base)
    out = tmp_path / "out"
    merge_patch(m, tok, patch, out)
    (out / "keep.txt").write_text("mine")
    kept = tree_digest(out)

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    for force in (False, True):
        target = out if force else tmp_path / "new"
        with pytest.raises(IclcaError, match="No space"):
            merge_patch(m, tok, patch, target, force=force)
    assert tree_digest(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]
    assert tree_digest(base) == before
