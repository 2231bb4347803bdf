"""Query positions start at P: each family's policy (families/base.py, POSITION_POLICIES) applied to a model, and
the hard limit a learned position table puts on prompt + query."""

from __future__ import annotations

import torch
from torch import nn

from .devices import materialised, module_device
from .errors import IclcaError
from .families import Family
from .models.patched_decoder import shift_rotary


def rotary_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> rotary embedding module (forward(x, position_ids, ...)): Gemma 3 has one for local and one
    for global layers in some versions, most models one."""
    found = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")}
    if not found:
        raise IclcaError(f"no rotary embedding module in this {model.config.model_type!r} model",
                         "its family file says positions='rotary'; check the model's layout")
    return found


def position_table(model: nn.Module, family: Family) -> nn.Embedding | None:
    if family.position_table is None:
        return None
    try:
        return model.get_submodule(family.position_table)
    except AttributeError:
        return None  # a model of the family without a table (iclca_linear with position_embedding_type "none")


def check_positions(model, family: Family, n_tokens: int, what: str) -> None:
    """With a learned position table, the tokens already folded in + n_tokens must fit into it."""
    table = position_table(model, family)
    if table is None:
        return
    offset = getattr(model.config, "position_offset", 0) if family.positions == "config" else 0
    rows = table.num_embeddings
    if offset + n_tokens > rows:
        taken = f" ({offset} already taken by the folded-in prompt)" if offset else ""
        raise IclcaError(f"{what} needs {offset + n_tokens} positions but the model has {rows}{taken}",
                         "shorten the prompt or queries, or use a model without a learned position table")


@torch.no_grad()
def start_queries_at(model, family: Family, offset: int) -> None:
    """Make the model's first token sit at position `offset` (in place)."""
    if family.positions == "rotary":
        for m in rotary_modules(model).values():
            shift_rotary(m, offset)
    elif family.positions == "learned":
        table = position_table(model, family)
        n, d = table.weight.shape
        device = module_device(table)  # an offloaded table (--device-map) is read back where it computes
        shifted = nn.Embedding(n - offset, d, device=device, dtype=table.weight.dtype)
        shifted.weight.copy_(materialised(table, "weight", table.weight)[offset:])  # row i = position offset + i
        parent, name = family.position_table.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, shifted)
        model.config.max_position_embeddings = n - offset
    elif family.positions == "config":
        model.config.position_offset = offset
