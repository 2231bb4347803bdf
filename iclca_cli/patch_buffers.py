"""How a merged folder's config lists its patch buffers: {"<module path>.<buffer>": [shape, dtype]}, which the
merged class registers as zeros for the checkpoint to fill (models/patched_decoder.py, models/patched_cache.py)."""

from __future__ import annotations

import torch


def buffer_specs(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in sorted(tensors.items())}
