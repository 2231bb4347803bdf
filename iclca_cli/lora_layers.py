"""Handler "weights" (handlers.py): a patch of low-rank updates of a model's linear projections (method lora), for
any family. Tensors '<module path>.lora_A' (r, in) and '<module path>.lora_B' (out, r) for each updated module; the
patched module computes y = W x + b + B (A x) (PEFT's LoRA with lora_alpha = r: the scale is 1, B holds it). The
query starts at position 0: nothing about positions here. `fold` writes the update into the weights themselves,
so a merged folder is the stock architecture.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .devices import module_device
from .errors import IclcaError
from .families import Family


def decoder_blocks(family: Family, config) -> list[str]:
    """The paths of the decoder layers (the part of family.layers up to the layer index)."""
    block = family.layers.split("{i}")[0] + "{i}"
    return [block.format(i=i) for i in range(config.num_hidden_layers)]


def in_out(module: nn.Module) -> tuple[int, int]:
    """(input, output) features of a linear module (GPT-2's Conv1D keeps its weight as (in, out))."""
    return tuple(module.weight.shape) if isinstance(module, Conv1D) else (module.in_features, module.out_features)


def targets(model, family: Family, names: tuple[str, ...] | None) -> dict[str, nn.Module]:
    """{path: module} of the linear projections updated: every nn.Linear (or Conv1D) in the decoder layers, or those
    whose name (the last part of their path) is one of `names`. Sorted by path."""
    found = {}
    for block in decoder_blocks(family, model.config):
        for sub, module in model.get_submodule(block).named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and sub:
                found[f"{block}.{sub}"] = module
    if names is not None:
        known = sorted({path.rsplit(".", 1)[-1] for path in found})
        unknown = [n for n in names if n not in known]
        if unknown:
            raise IclcaError(f"--targets {','.join(unknown)}: no such linear module in the decoder layers of this "
                             f"{family.model_type!r} model", f"its projections: {','.join(known)}")
        found = {path: m for path, m in found.items() if path.rsplit(".", 1)[-1] in names}
    return dict(sorted(found.items()))


def shapes(model, family: Family, method) -> dict[str, tuple[int, ...]]:
    """'<path>.lora_A' -> (r, in) and '<path>.lora_B' -> (out, r) for each module the method updates, by path."""
    out = {}
    for path, module in targets(model, family, method.target_names()).items():
        n_in, n_out = in_out(module)
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = (method.rank, n_in), (n_out, method.rank)
    return out


def convert(model, family: Family, prompt_ids: list[int], method, chunk_size: int = 512,
            progress=None) -> dict[str, torch.Tensor]:
    """The untrained update, as PEFT starts one: A uniform in +-1/sqrt(in) (Kaiming, seeded by method.seed), B zero,
    so the patched model starts as the model itself; method.trained trains it. The prompt is read there."""
    generator = torch.Generator().manual_seed(method.seed)
    dtype = next(model.parameters()).dtype
    tensors = {}
    for name, shape in shapes(model, family, method).items():
        if name.endswith(".lora_A"):  # (r, in), drawn module after module
            a = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * (1 / math.sqrt(shape[1]))
            tensors[name] = a.to(dtype)
        else:  # (out, r)
            tensors[name] = torch.zeros(shape, dtype=dtype)
    return tensors


def expected_shapes(model, family: Family, patch) -> dict[str, tuple[int, ...]]:
    return shapes(model, family, patch.method)


class _Update(nn.Module):
    """A weight parametrization (torch.nn.utils.parametrize): W -> W + B A, with A and B the buffers of the module
    that owns W, so that every read of the weight sees the update (Mamba reads dt_proj.weight without calling it)."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self._owner = [owner]  # a list: the owner is not a submodule of its own parametrization
        self.transposed = isinstance(owner, Conv1D)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        delta = owner.lora_B.to(weight.dtype) @ owner.lora_A.to(weight.dtype)  # (out, r) @ (r, in) -> (out, in)
        return weight + (delta.T if self.transposed else delta)


def attach(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> None:
    """Each update's A and B as buffers of its module (where it computes, in the model's dtype), and its weight
    parametrized as W + B A (once per module, however often a patch is attached). The parameters themselves are
    not written: a patched copy shares them with the model."""
    from torch.nn.utils import parametrize

    if any(p.device.type == "meta" for p in model.parameters()):
        raise IclcaError("lora with weights offloaded by --device-map is not supported yet (the update is a "
                         "parametrization of the weights, which accelerate's offloading replaces)",
                         "give --max-memory room for every weight on the devices, or convert without --device-map")
    if family.restore_weights:  # weights rescaled in place for inference (RWKV): rescale them now, for the update
        model.base_model.eval()  # is on the weights as the model computes with them (a parametrized weight
        getattr(model.base_model, family.restore_weights)()  # cannot be rescaled in place later)
    dtype = next(model.parameters()).dtype
    for name, t in tensors.items():
        path, buffer = name.rsplit(".", 1)
        module = model.get_submodule(path)
        module.register_buffer(buffer, t.to(device=module_device(module), dtype=dtype).clone())
    for name in tensors:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith(".lora_B") and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", _Update(module), unsafe=True)


def merged_config(model, family: Family, tensors: dict[str, torch.Tensor], offset: int) -> dict:
    """Nothing: a merged lora patch is in the weights (fold), the config is the stock one."""
    return {}


@torch.no_grad()
def fold(model, family: Family, tensors: dict[str, torch.Tensor]):
    """A copy of `model` (its own weights) with every update written into its weight: W + B A (computed in float64,
    stored in the weight's dtype); the stock class, no parametrization, no buffers. A family that rescales weights in place
    for inference (RWKV) gets the update on the weights as it computes with them, then its weights back as trained."""
    folded = copy.deepcopy(model).eval()
    restore = getattr(folded.base_model, family.restore_weights) if family.restore_weights else None
    if restore is not None:
        restore()  # in eval mode: the weights as the patched model computes with them
    for name in sorted(tensors):
        if not name.endswith(".lora_A"):
            continue
        path = name.removesuffix(".lora_A")
        module = folded.get_submodule(path)
        delta = tensors[f"{path}.lora_B"].double() @ tensors[name].double()  # (out, in)
        weight = module.weight
        weight.copy_((weight.double() + (delta.T if isinstance(module, Conv1D) else delta).to(weight.device)).to(weight.dtype))
    if restore is not None:  # in train mode: back as trained (what a checkpoint holds)
        folded.base_model.train()
        restore()
    return folded.eval()
