"""The patch file: round trip, metadata contract, determinism, and refusal of bad or foreign patches."""


import pytest
import torch
from safetensors.torch import save_file

from helpers import make_linear_model, convert, random_ids
from iclca_cli.errors import IclcaError
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.patch import check_patch_fits, load_patch, save_patch

DESIGN_KEYS = {"format", "iclca.format_version", "iclca.method", "iclca.model_type", "iclca.base_fingerprint",
               "iclca.prompt_sha256", "iclca.prompt_tokens", "iclca.position_offset", "iclca.dtype", "iclca.version"}


@pytest.fixture
def patch():
    _, p = convert(make_linear_model(20), random_ids(25, seed=20))
    return p


def test_round_trip_is_bit_exact_and_carries_the_metadata(tmp_path, patch):
    path = tmp_path / "p.safetensors"
    save_patch(patch, path)
    back = load_patch(path)
    assert back.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert DESIGN_KEYS <= set(back.metadata())
    assert back.metadata() == patch.metadata()
    assert back.metadata()["format"] == "pt" and back.dtype == "float64"
    assert set(back.tensors) == {f"transformer.h.{i}.attn.{n}" for i in (0, 1) for n in ("memory_kv", "memory_k")}
    assert back.tensors["transformer.h.0.attn.memory_kv"].shape == (4, 8, 8)  # (H, F, Dv)
    assert back.tensors["transformer.h.0.attn.memory_k"].shape == (4, 8)  # (H, F)


def test_same_inputs_give_a_byte_identical_file(tmp_path):
    model, prompt = make_linear_model(21), random_ids(40, seed=21)
    for name in ("a", "b"):
        _, p = convert(model, prompt)
        save_patch(p, tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, patch, monkeypatch):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"old contents")
    monkeypatch.setattr("iclca_cli.patch.canonical_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_patch(patch, path)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all", b"\xff" * 100],
                         ids=["empty", "short", "text", "junk"])
def test_garbage_is_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(IclcaError, match="not a readable safetensors patch"):
        load_patch(path)


def test_truncated_patch_is_refused(tmp_path, patch):
    path = tmp_path / "p.safetensors"
    save_patch(patch, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IclcaError, match="not a readable safetensors patch"):
        load_patch(path)


def test_safetensors_without_patch_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(IclcaError, match="lacks patch metadata"):
        load_patch(path)


@pytest.mark.parametrize("key,value,message", [
    ("iclca.method", "magic", "unknown method"),
    ("iclca.format_version", "99", "patch format"),
    ("iclca.prompt_tokens", "many", "non-integer"),
])
def test_bad_metadata_is_refused(tmp_path, patch, key, value, message):
    meta = patch.metadata()
    meta[key] = value
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in patch.tensors.items()}, path, metadata=meta)
    with pytest.raises(IclcaError, match=message):
        load_patch(path)


def test_metadata_is_data_never_code(tmp_path, patch):
    meta = patch.metadata()
    meta["iclca.note"] = "__import__('os').system('touch pwned')"
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in patch.tensors.items()}, path, metadata=meta)
    assert load_patch(path).extra["note"] == meta["iclca.note"]
    assert not (tmp_path / "pwned").exists()


def test_patch_for_another_model_is_refused(patch):
    other = make_linear_model(99)
    with pytest.raises(IclcaError, match="was made for model"):
        check_patch_fits(patch, other, model_fingerprint(other))


def test_patch_whose_shapes_do_not_fit_is_refused(patch):
    wider = make_linear_model(20, hidden_size=64)
    patch.base_fingerprint = model_fingerprint(wider)  # even with a matching fingerprint
    with pytest.raises(IclcaError, match="has shape"):
        check_patch_fits(patch, wider, patch.base_fingerprint)


def test_fingerprint_ignores_the_dtype_the_model_runs_in():
    assert model_fingerprint(make_linear_model(22, torch.float32)) == model_fingerprint(
        make_linear_model(22, torch.float32).double())
    assert model_fingerprint(make_linear_model(22)) != model_fingerprint(make_linear_model(23))
