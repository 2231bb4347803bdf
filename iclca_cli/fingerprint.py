"""A model's identity: sha256 over its architecture config and its weights, whatever dtype it runs in; cached per
checkpoint folder against the identity (path, size, modification time) of its files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .cache_store import add_to_store, read_store
from .devices import materialised

# Config keys that describe how a model was saved or is run, not what it computes.
_RUNTIME_KEYS = {
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
    "return_dict", "output_hidden_states", "output_attentions", "name_or_path",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # weights, their indexes, config.json


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex digest of the architecture config and every tensor of the state dict (as float32)."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _RUNTIME_KEYS and not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = materialised(model, name, t).detach().cpu()  # offloaded weights (--device-map) are read back
        if t.is_floating_point():
            t = t.to(torch.float32)  # float32 weights loaded as float64 keep their fingerprint
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _folder_identity(folder: Path, dtype: torch.dtype) -> str | None:
    """A key that changes whenever a file the model is loaded from changes (path, size, mtime in ns), or None."""
    try:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                       if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    except OSError:
        return None
    ident = json.dumps([str(folder.resolve()), str(dtype), files])
    return hashlib.sha256(ident.encode()).hexdigest()


def folder_fingerprint(model: torch.nn.Module, folder: str | Path) -> str:
    """model_fingerprint(model) for a model just loaded from `folder`, computed once per state of the folder's files
    (a sha256 over every weight takes seconds for a large model). A hub id (no local folder) is not cached."""
    folder = Path(folder)
    dtype = next(model.parameters()).dtype  # a float32 checkpoint loaded in bfloat16 has other weights
    key = _folder_identity(folder, dtype) if folder.is_dir() else None
    if key is None:
        return model_fingerprint(model)
    known = read_store("fingerprints.json").get(key)
    if isinstance(known, str):
        return known
    fingerprint = model_fingerprint(model)
    add_to_store("fingerprints.json", key, fingerprint)
    return fingerprint
