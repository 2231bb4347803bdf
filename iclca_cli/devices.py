"""Where a model computes: one device (cpu, cuda, cuda:N, mps), or accelerate's big-model placement
(`--device-map auto`: layers spread over the GPUs present, offloaded to CPU or disk past `--max-memory`). An
offloaded module's parameters are on the meta device between forwards; its accelerate hook knows where it runs."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile

import torch
from torch import nn

from .errors import IclcaError

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_MEMORY = re.compile(r"^\s*(cpu|disk|mps|\d+)\s*=\s*(\d+(\.\d+)?\s*[KMGT]i?B)\s*$", re.IGNORECASE)


def torch_device(name: str) -> torch.device:
    """The torch device of a --device name, or an IclcaError if this machine has no such device."""
    if not _DEVICE.match(name):
        raise IclcaError(f"unsupported device {name!r}", "use --device cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise IclcaError(f"--device {name} asked for, but this machine has {have}",
                             "use --device cpu" + (f", or cuda:0 to cuda:{count - 1}" if count else ""))
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise IclcaError("--device mps asked for, but Apple's MPS backend is not available here", "use --device cpu")
    return torch.device(name)


def parse_max_memory(spec: str | None) -> dict | None:
    """accelerate's max_memory from "0=20GiB,1=20GiB,cpu=64GiB" (GPU index, cpu or mps = an amount)."""
    if not spec:
        return None
    limits = {}
    for part in spec.split(","):
        m = _MEMORY.match(part)
        if not m:
            raise IclcaError(f"cannot read --max-memory part {part.strip()!r}",
                             'write DEVICE=AMOUNT pairs, e.g. "0=20GiB,cpu=64GiB" (DEVICE: a GPU index, cpu or mps)')
        device = m.group(1).lower()
        limits[int(device) if device.isdigit() else device] = m.group(2).replace(" ", "")
    return limits


def offload_folder() -> str:
    """A folder for weights that fit nowhere else, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="iclca-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def module_device(module: nn.Module) -> torch.device:
    """Where a module computes: its accelerate hook's execution device, else where its tensors are."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: where its token embedding computes."""
    return module_device(model.get_input_embeddings())


def materialised(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """state_dict entry `name` with its values: an offloaded one (on the meta device) is read back on the CPU."""
    if tensor.device.type != "meta":
        return tensor
    from accelerate.utils import align_module_device

    path, _, local = name.rpartition(".")
    module = model.get_submodule(path)
    with align_module_device(module, torch.device("cpu")):
        return getattr(module, local).detach().clone()


def shared_memo(model: nn.Module) -> dict:
    """deepcopy memo that keeps a model's weights shared with a copy: its parameters, and the weights accelerate holds
    for offloaded modules (hooks' weights maps)."""
    memo = {id(p): p for p in model.parameters()}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for attr in ("weights_map", "tied_params_map"):
            value = getattr(hook, attr, None)
            if value is not None:
                memo[id(value)] = value
    return memo
