"""A patch as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
- `prefix` -> prefix tuning. PEFT feeds the adapter's keys/values as the cache, so the query's positions start at P
  as in the prompted run: `PeftModel.from_pretrained(base, folder)` on a query gives the prompted logits.
- `lora` -> a LoRA adapter (lora_alpha = r, so PEFT's scale is 1 as in the patch), which multi-LoRA servers load
  beside the base model (vLLM's --lora-modules, SGLang).
Needs the optional dependency `peft` (`pip install "iclca[peft]"`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import IclcaError
from .families import family_of
from .outputs import PROVENANCE_FILE, check_folder_target, write_folder
from .methods.lora import Lora
from .methods.prefix import Prefix
from .patch import Patch


def write_peft_adapter(model, patch: Patch, base_model_name_or_path: str, out_dir: str | Path,
                       force: bool = False) -> tuple[Path, dict]:
    """(the adapter folder, what the report says of it) for a prefix or lora patch; other methods are refused."""
    if isinstance(patch.method, Lora):
        folder, modules = write_peft_lora_adapter(model, patch, base_model_name_or_path, out_dir, force)
        return folder, {"adapter_type": "LORA", "rank": patch.method.rank, "target_modules": modules}
    folder = write_peft_prefix_adapter(model, patch, base_model_name_or_path, out_dir, force)
    return folder, {"adapter_type": "PREFIX_TUNING", "num_virtual_tokens": patch.prompt_tokens}


def write_peft_lora_adapter(model, patch: Patch, base_model_name_or_path: str, out_dir: str | Path,
                            force: bool = False) -> tuple[Path, int]:
    """Write a lora patch's updates as a PEFT LoRA adapter (every updated module named by its full path); returns
    (the folder, how many modules it updates)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    LoraConfig, get_peft_model = _peft("LoraConfig", "get_peft_model")
    paths = sorted(name.removesuffix(".lora_A") for name in patch.tensors if name.endswith(".lora_A"))
    conv = [isinstance(model.get_submodule(p), Conv1D) for p in paths]
    if any(conv) and not all(conv):
        raise IclcaError("a PEFT LoRA adapter takes GPT-2's Conv1D projections or linear layers, not both at once",
                         "convert with --targets naming one kind, or `iclca merge`")
    out = Path(out_dir).absolute()
    check_folder_target(out, force)
    config = LoraConfig(task_type="CAUSAL_LM", r=patch.method.rank, lora_alpha=patch.method.rank, lora_dropout=0.0,
                        target_modules=paths, fan_in_fan_out=all(conv), bias="none",
                        base_model_name_or_path=base_model_name_or_path)
    try:
        peft_model = get_peft_model(copy.deepcopy(model), config)
    except ValueError as e:  # PEFT refuses some modules of some families (Mamba's out_proj: its kernels read it)
        raise IclcaError(f"PEFT will not write this adapter: {str(e).splitlines()[0][:300]}",
                         "convert with --targets naming other projections, or use `iclca merge`") from e
    with torch.no_grad():
        for path in paths:
            module = peft_model.base_model.model.get_submodule(path)
            module.lora_A["default"].weight.copy_(patch.tensors[f"{path}.lora_A"])
            module.lora_B["default"].weight.copy_(patch.tensors[f"{path}.lora_B"])
    _write(peft_model, out, {**patch.metadata(), "iclca.written_as": "peft lora adapter"})
    return out, len(paths)


def _peft(*names):
    """Names from peft, or an IclcaError saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise IclcaError("writing a PEFT adapter needs the package peft", 'pip install "iclca[peft]"') from e
    return tuple(getattr(peft, n) for n in names)


def _write(peft_model, out: Path, provenance: dict) -> None:
    """The adapter folder and iclca.json, atomically."""

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")

    write_folder(out, write)


def write_peft_prefix_adapter(model, patch: Patch, base_model_name_or_path: str, out_dir: str | Path,
                              force: bool = False) -> Path:
    """Write the adapter folder for `model` (left unchanged) into `out_dir`, atomically."""
    PrefixTuningConfig, get_peft_model, initialize_kv_prefix_from_past_key_values = _peft(
        "PrefixTuningConfig", "get_peft_model", "initialize_kv_prefix_from_past_key_values")
    family = family_of(model)
    if not family.peft:
        raise IclcaError(f"PEFT prefix tuning does not reproduce {family.model_type!r} prefix patches",
                         "use the patch itself, or `iclca merge`")
    if not isinstance(patch.method, Prefix):
        raise IclcaError(f"only prefix and lora patches become PEFT adapters, this one is {patch.method.name!r}",
                         "convert with --method prefix or --method lora")
    past = [(patch.tensors[f"{path}.prefix_keys"][None],  # (1, Hkv, P, D)
             patch.tensors[f"{path}.prefix_values"][None]) for path in family.layer_paths(model.config)]
    if any(k.shape[-2] != patch.prompt_tokens for k, _ in past):
        raise IclcaError("a PEFT prefix has one length for every layer, but this model's sliding-window layers keep "
                         "only the last window-1 prompt tokens", "use a prompt shorter than the window, or `iclca merge`")
    out = Path(out_dir).absolute()
    check_folder_target(out, force)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=patch.prompt_tokens,
                                base_model_name_or_path=base_model_name_or_path)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    initialize_kv_prefix_from_past_key_values(peft_model, past_key_values=past)
    _write(peft_model, out, {**patch.metadata(), "iclca.written_as": "peft prefix-tuning adapter"})
    return out
