"""A model's identity: sha256 over its architecture config and its weights, whatever dtype it runs in."""

from __future__ import annotations

import hashlib
import json

import torch

# Config keys that describe how a model was saved or is run, not what it computes.
_RUNTIME_KEYS = {
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
    "return_dict", "output_hidden_states", "output_attentions", "name_or_path",
}


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex digest of the architecture config and every tensor of the state dict (as float32)."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _RUNTIME_KEYS and not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)  # float32 weights loaded as float64 keep their fingerprint
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
