"""A model's identity: sha256 over its architecture config and its weights, whatever dtype it runs in (cached per
checkpoint folder against the identity (path, size, modification time) of its files), and over its tokenizer: a patch
never meets another vocabulary. Patches record what their fingerprint covers (iclca.fingerprint_covers); one made
before the tokenizer was covered is checked the old way, on config and weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


WITH_TOKENIZER, WITHOUT_TOKENIZER = "config,weights,tokenizer", "config,weights"
_PROBE = " Hello, World! 12345 naïve café — ß 東京 \n\tdone.<|endoftext|></s><s>"  # normaliser, splits, special tokens


@dataclass(frozen=True)
class Fingerprint:
    """A base model's identity: `model` over config and weights, `tokenizer` over its tokenizer (None where the
    caller has no tokenizer, as in the Python API's convert_prompt)."""

    model: str
    tokenizer: str | None = None

    @property
    def covers(self) -> str:
        return WITH_TOKENIZER if self.tokenizer else WITHOUT_TOKENIZER

    @property
    def full(self) -> str:
        """What a patch records as iclca.base_fingerprint."""
        if not self.tokenizer:
            return self.model
        return hashlib.sha256(f"{self.model}+{self.tokenizer}".encode()).hexdigest()

    def made_for(self, recorded: str, covers: str | None) -> bool:
        """Whether a patch that recorded fingerprint `recorded` over `covers` was made for this model."""
        if (covers or WITHOUT_TOKENIZER) == WITHOUT_TOKENIZER:  # before the tokenizer was covered
            return recorded == self.model
        return covers == WITH_TOKENIZER and self.tokenizer is not None and recorded == self.full


def as_fingerprint(value: str | Fingerprint) -> Fingerprint:
    """A Fingerprint from what a caller passed: a bare string is a model fingerprint (config and weights)."""
    return value if isinstance(value, Fingerprint) else Fingerprint(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides a prompt's ids: the vocabulary (token -> id, added tokens included), the special
    tokens, and the ids of a probe text with and without special tokens (the normaliser, pre-tokeniser and merges at
    work). Not the tokenizer's class or file bytes, which change with library versions while the ids do not."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(getattr(tokenizer, "all_special_tokens", []) or [])
    probe = [tokenizer(_PROBE).input_ids, tokenizer(_PROBE, add_special_tokens=False).input_ids]
    return hashlib.sha256(json.dumps([vocab, special, probe], ensure_ascii=False).encode()).hexdigest()


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
