"""Patch + base checkpoint -> a new Hugging Face checkpoint folder whose bias terms are part of the model.

The folder carries the self-contained modeling file and an `auto_map`, so it loads with plain
transformers (`trust_remote_code=True`) where iclca is not installed, and through iclca without it.
It is written into a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import IclcaError
from .patch import Patch, apply_patch, model_family

PROVENANCE_FILE = "iclca.json"


def check_output_folder(out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise IclcaError(f"parent folder of {out} does not exist", "create it first, or choose another --out")
    if out.exists() and not force:
        raise IclcaError(f"output folder {out} already exists", "choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise IclcaError(f"output path {out} is a file, not a folder", "choose another --out")


def merge_patch(model, tokenizer, patch: Patch, out_dir: str | Path, force: bool = False) -> Path:
    """Write `model` with `patch` folded in to `out_dir`; the patch must already fit the model."""
    out = Path(out_dir).absolute()
    check_output_folder(out, force)
    model, modeling_files = merged_model(model, patch)
    module_name = modeling_files[0].removesuffix(".py")
    model.config.auto_map = {
        "AutoConfig": f"{module_name}.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"{module_name}.{type(model).__name__}",
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in modeling_files:
            shutil.copy(Path(__file__).parent / "models" / name, tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(patch.metadata(), indent=2, sort_keys=True) + "\n")

    write_folder(out, write)
    return out


@torch.no_grad()
def merged_model(model, patch: Patch):
    """(model with the patch folded in, the modeling files its folder carries, the first holding its classes)."""
    family = model_family(model)
    if family not in ("iclca_linear", "gpt2", "llama"):
        raise IclcaError(f"merging {family!r} patches into a checkpoint folder is not supported yet",
                         "use the patch as it is: `iclca eval --patch` applies it in memory")
    apply_patch(model, patch)
    if family == "iclca_linear":
        return model, ("modeling_iclca_linear.py",)
    from .models.modeling_iclca_gpt2 import IclcaGPT2Config, IclcaGPT2LMHeadModel
    from .models.modeling_iclca_llama import IclcaLlamaConfig, IclcaLlamaForCausalLM

    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version") and not k.startswith("_")}
    first = {n.rsplit(".", 1)[-1]: t for n, t in patch.tensors.items() if ".0." in n}  # layer 0's tensors
    feature_dim = first["memory_k"].shape[-1] if "memory_k" in first else 0
    entries = first["prefix_keys"].shape[-2] if "prefix_keys" in first else 0
    common = {"iclca_method": patch.method, "iclca_prompt_tokens": patch.position_offset,
              "iclca_feature_dim": feature_dim, "iclca_entries": entries}
    if family == "gpt2":
        merged, files = IclcaGPT2LMHeadModel(IclcaGPT2Config(**fields, **common)), ("modeling_iclca_gpt2.py",)
    else:
        merged = IclcaLlamaForCausalLM(IclcaLlamaConfig(**fields, **common))
        files = ("modeling_iclca_llama.py", "modeling_iclca_gpt2.py")
    merged = merged.to(model.dtype)
    merged.load_state_dict(model.state_dict(), strict=True)  # shifted position table / patch buffers included
    return merged.eval(), files


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) in a temporary folder beside `out`, then move it into place; on any failure
    the temporary folder is removed and `out` is as it was."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise IclcaError(f"cannot write into {out.parent}: {e.strerror}", "choose an --out in a writable folder") from e
    try:
        write(tmp)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` is removed only after the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_provenance(folder: str | Path) -> dict[str, str] | None:
    p = Path(folder) / PROVENANCE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def load_merged(folder: str | Path, base_fingerprint: str, dtype: str = "float32", device: str = "cpu"):
    """(merged model, method, patch bytes, bytes per patch element) of a folder written by merge_patch,
    refused unless it was merged from the base model with `base_fingerprint`."""
    from .loading import load_model
    from .patch import DTYPES, TENSOR_NAMES

    try:
        provenance = read_provenance(folder)
        method, element = provenance["iclca.method"], DTYPES[provenance["iclca.dtype"]].itemsize
        made_from = provenance["iclca.base_fingerprint"]
    except (TypeError, KeyError, ValueError) as e:
        raise IclcaError(f"{folder} has no readable {PROVENANCE_FILE}: not a folder written by `iclca merge`",
                         "pass --merged DIR from `iclca merge`") from e
    if made_from != base_fingerprint:
        raise IclcaError(f"merged folder {folder} was made from another base model", "pass the --model it was merged from")
    model, _ = load_model(str(folder), dtype, device)
    names = TENSOR_NAMES.get(method, ())
    nbytes = sum(b.numel() * element for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in names)
    return model, method, nbytes, element
