"""Patch + base checkpoint -> a new Hugging Face checkpoint folder whose bias terms are part of the model.

The folder carries the self-contained modeling file and an `auto_map`, so it loads with plain
transformers (`trust_remote_code=True`) where iclca is not installed, and through iclca without it.
It is written into a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .errors import IclcaError
from .models import MODELING_FILES
from .patch import Patch, apply_patch

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
    model_type = model.config.model_type
    if model_type not in MODELING_FILES:
        raise IclcaError(f"merging is not supported for {model_type!r} models", "use the patch with `iclca eval --patch`")
    apply_patch(model, patch)
    module_name = MODELING_FILES[model_type].removesuffix(".py")
    model.config.auto_map = {
        "AutoConfig": f"{module_name}.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"{module_name}.{type(model).__name__}",
    }
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise IclcaError(f"cannot write into {out.parent}: {e.strerror}", "choose an --out in a writable folder") from e
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(__file__).parent / "models" / MODELING_FILES[model_type], tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(patch.metadata(), indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
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
