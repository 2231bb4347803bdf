"""Finding and loading a model: a built-in demo name, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .devices import offload_folder, parse_max_memory, torch_device
from .errors import IclcaError
from .patch import DTYPES

BUILTIN_DIR = Path(__file__).parent / "builtin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"


def builtin_models() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file()) if BUILTIN_DIR.is_dir() else []


def resolve_model(spec: str, allow_pickle: bool = False) -> str:
    """The folder (or hub id) that `spec` names; an IclcaError when a local folder is not a checkpoint
    or holds only pickled weights and `allow_pickle` is off."""
    if spec in builtin_models():
        return str(BUILTIN_DIR / spec)
    p = Path(spec)
    if not p.exists() and _HUB_ID.match(spec):
        return spec  # a hub id such as "gpt2" or "org/name": loaded by transformers (needs the network once)
    if not p.is_dir():
        raise IclcaError(
            f"model folder not found: {spec}",
            f"pass a checkpoint folder, a hub id, or a built-in model ({', '.join(builtin_models())})",
        )
    if not (p / "config.json").is_file():
        raise IclcaError(f"model folder {spec} has no config.json", "pass a Hugging Face checkpoint folder (save_pretrained)")
    if not _has_safetensors(p):
        if not _has_pickle(p):
            raise IclcaError(f"model folder {spec} has no model.safetensors", "pass a folder written by save_pretrained")
        if not allow_pickle:
            raise IclcaError(
                f"model folder {spec} has only pickled .bin weights, which can run code when loaded",
                "re-save it as safetensors (save_pretrained), or pass --allow-pickle if you trust its source",
            )
    return str(p)


def _has_safetensors(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def _has_pickle(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def torch_dtype(name: str) -> torch.dtype | str:
    """The torch dtype of a --dtype name; "auto" (the checkpoint's own dtype) passes through to transformers."""
    if name == "auto":
        return name
    if name not in DTYPES:
        raise IclcaError(f"unsupported dtype {name!r}", f"use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def register_classes(folder: Path | None) -> None:
    """Register with the Auto classes what this folder needs of iclca's (its family's classes), or everything for a
    hub id, whose config is not read until transformers fetches it."""
    from .models import merged

    try:
        merged.register_model_type(json.loads((folder / "config.json").read_text())["model_type"])
    except (TypeError, OSError, ValueError, KeyError):  # no folder, or a config transformers will refuse itself
        merged.register_auto_classes()


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False,
               device_map: str | None = None, max_memory: str | None = None):
    """(model in eval mode, tokenizer) for a model spec; never runs code from the checkpoint. Weights
    come from safetensors; pickled .bin weights only with allow_pickle (then with torch's weights_only).
    device_map "auto": accelerate places the layers (devices.py), within max_memory ("0=20GiB,cpu=64GiB")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, allow_pickle)
    dt = torch_dtype(dtype)
    dev = torch_device(device) if device_map is None else None
    placement = {}
    if device_map is not None:
        if device_map != "auto":
            raise IclcaError(f"unsupported --device-map {device_map!r}", "use --device-map auto, or --device")
        placement = {"device_map": "auto", "max_memory": parse_max_memory(max_memory), "offload_folder": offload_folder()}
    elif max_memory:
        raise IclcaError("--max-memory limits --device-map auto's placement", "add --device-map auto, or drop --max-memory")
    local = Path(path).is_dir()
    register_classes(Path(path) if local else None)
    use_safetensors = not (local and allow_pickle and not _has_safetensors(Path(path)))
    try:
        # mixture-of-experts layers: torch's grouped matmul takes no float64, the eager loop over experts does
        experts = {"experts_implementation": "eager"} if dt == torch.float64 else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=use_safetensors,
                                                     trust_remote_code=False, **experts, **placement)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise IclcaError(
            f"cannot load model {spec!r}: {str(e).splitlines()[0][:200]}",
            f"pass a local checkpoint folder or a built-in model ({', '.join(builtin_models())}); hub ids need the network",
        ) from e
    return (model.to(dev) if dev is not None else model).eval(), tokenizer


def load_fingerprinted(spec: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False,
                       device_map: str | None = None, max_memory: str | None = None):
    """(model, tokenizer, fingerprint): load_model, and the model's fingerprint from the cache kept per checkpoint
    folder (fingerprint.folder_fingerprint)."""
    from .fingerprint import folder_fingerprint

    model, tokenizer = load_model(spec, dtype, device, allow_pickle, device_map, max_memory)
    return model, tokenizer, folder_fingerprint(model, resolve_model(spec, allow_pickle))
