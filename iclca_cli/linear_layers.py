"""Linear-attention layers (method `exact`): the prompt runs through the model once, chunk by chunk, carrying its
state in the model's own transformers cache, and the state left in the cache is the patch (ICLCA's bias terms).

A family names its states (`Family.state_names`): the patch tensor '<layer path>.<name>' is recurrent state j of
that layer's cache layer. Applying a patch sets the model's bias buffers of those names and its position offset.
"""

from __future__ import annotations

import torch

from .cache_layers import Progress, run_prompt
from .families import LINEAR_KINDS, Family
from .positions import start_queries_at


def linear_layers(model, family: Family) -> dict[int, str]:
    """Layer index -> module path of every linear-attention layer."""
    kinds = family.layer_kinds(model.config)
    return {i: path for i, (path, kind) in enumerate(zip(family.layer_paths(model.config), kinds)) if kind in LINEAR_KINDS}


def convert(model, family: Family, prompt_ids: list[int], method=None, chunk_size: int = 512,
            progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Run the prompt from the model's current state (its bias buffers) through its cache, and return the final
    states '<layer path>.<state name>' (batch dimension dropped). The method is `exact`: nothing else acts here."""
    cache = run_prompt(model, prompt_ids, chunk_size, progress)
    return {f"{path}.{name}": cache.get_recurrent_state(i, j)[0].contiguous()
            for i, path in linear_layers(model, family).items() for j, name in enumerate(family.state_names)}


def expected_shapes(model, family: Family, patch=None) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's state buffers: a patch must match them."""
    return {f"{path}.{name}": tuple(model.get_buffer(f"{path}.{name}").shape)
            for path in linear_layers(model, family).values() for name in family.state_names}


def merged_config(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> dict:
    """Nothing: the family's own class carries the patch in its buffers and config.position_offset."""
    return {}


@torch.no_grad()
def attach(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> None:
    """The states become the model's bias buffers; queries start at `offset`."""
    for name, t in tensors.items():
        buf = model.get_buffer(name)
        buf.copy_(t.to(device=buf.device, dtype=buf.dtype))
    start_queries_at(model, family, offset)
