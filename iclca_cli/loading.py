"""Finding and loading a model: a built-in demo name, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import socket
import warnings
from pathlib import Path

import torch

from .devices import offload_folder, parse_max_memory, torch_device
from .errors import IclcaError, IclcaWarning
from .patch import DTYPES

BUILTIN_DIR = Path(__file__).parent / "builtin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"


def builtin_models() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file()) if BUILTIN_DIR.is_dir() else []


def resolve_model(spec: str, allow_pickle: bool = False) -> str:
    """The folder (or hub id) that `spec` names: a local path first, then a built-in name, then a hub id; an
    IclcaError when a local folder is not a checkpoint or holds only pickled weights and `allow_pickle` is off, or
    when a name is neither here nor reachable."""
    p = Path(spec)
    if spec in builtin_models():
        if not p.exists():
            return str(BUILTIN_DIR / spec)
        warnings.warn(f"{spec} is both a local path and a built-in model name; using the local path "
                      f"(the built-in is {BUILTIN_DIR / spec})", IclcaWarning, stacklevel=2)
    if not p.exists() and _HUB_ID.match(spec):
        _check_hub_id(spec)
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


def _check_hub_id(spec: str) -> None:
    """Fail at once, not after a minute of retries, for a hub id that cannot be had: a near miss of a built-in name,
    or a model neither in the local hub cache nor reachable (offline)."""
    close = difflib.get_close_matches(spec, builtin_models(), n=1, cutoff=0.75)
    if close and "/" not in spec:
        raise IclcaError(f"model {spec!r} is not a folder, a built-in model or a hub id iclca can find",
                         f"did you mean {close[0]}?")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # an id the hub library refuses: transformers will say why
        return
    if cached:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or not _hub_reachable():
        raise IclcaError(f"model {spec!r} is not a local folder or a built-in model, and the Hugging Face hub cannot "
                         "be reached to download it", f"pass a checkpoint folder or a built-in model "
                         f"({', '.join(builtin_models())}), or connect to the network")


@functools.cache  # once per process: resolve_model runs a few times per command
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens (through a proxy, assumed so: transformers will find out)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


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
    except ImportError as e:
        missing = getattr(e, "name", None) or "a package"
        raise IclcaError(f"loading model {spec!r} needs {missing}: {str(e).splitlines()[0][:160]}",
                         f"pip install {missing}" if getattr(e, "name", None) else "install the package it names") from e
    except (OSError, ValueError, KeyError) as e:
        raise IclcaError(
            f"cannot load model {spec!r}: {str(e).splitlines()[0][:200]}",
            f"pass a local checkpoint folder or a built-in model ({', '.join(builtin_models())}); hub ids need the network",
        ) from e
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    if not any(token not in special for token in tokenizer.get_vocab()):
        raise IclcaError(f"model {spec!r} has no tokenizer (no tokenizer files, only special tokens)",
                         "add the tokenizer files of the model it was trained with (tokenizer.json, "
                         "tokenizer_config.json, ...): save_pretrained of its tokenizer")
    return (model.to(dev) if dev is not None else model).eval(), tokenizer


def load_fingerprinted(spec: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False,
                       device_map: str | None = None, max_memory: str | None = None):
    """(model, tokenizer, Fingerprint): load_model, the model's fingerprint from the cache kept per checkpoint
    folder (fingerprint.folder_fingerprint), and its tokenizer's."""
    from .fingerprint import Fingerprint, folder_fingerprint, tokenizer_fingerprint

    model, tokenizer = load_model(spec, dtype, device, allow_pickle, device_map, max_memory)
    path = resolve_model(spec, allow_pickle)
    return model, tokenizer, Fingerprint(folder_fingerprint(model, path), tokenizer_fingerprint(tokenizer))
