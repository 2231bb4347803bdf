"""A `prefix` patch as a PEFT prefix-tuning adapter folder (adapter_config.json + adapter_model.safetensors).

PEFT feeds the adapter's keys/values as the cache, so the query's positions start at P as in the prompted run:
`PeftModel.from_pretrained(base, folder)` on a query gives the prompted logits.
Needs the optional dependency `peft` (`pip install "iclca[peft]"`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import IclcaError
from .families import family_of
from .outputs import PROVENANCE_FILE, check_folder_target, write_folder
from .methods.prefix import Prefix
from .patch import Patch


def write_peft_prefix_adapter(model, patch: Patch, base_model_name_or_path: str, out_dir: str | Path,
                              force: bool = False) -> Path:
    """Write the adapter folder for `model` (left unchanged) into `out_dir`, atomically."""
    try:
        from peft import PrefixTuningConfig, get_peft_model, initialize_kv_prefix_from_past_key_values
    except ImportError as e:
        raise IclcaError("writing a PEFT adapter needs the package peft", 'pip install "iclca[peft]"') from e
    family = family_of(model)
    if not family.peft:
        raise IclcaError(f"PEFT prefix tuning does not reproduce {family.model_type!r} prefix patches",
                         "use the patch itself, or `iclca merge`")
    if not isinstance(patch.method, Prefix):
        raise IclcaError(f"only prefix patches become PEFT adapters, this one is {patch.method.name!r}",
                         "convert with --method prefix")
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
    provenance = {**patch.metadata(), "iclca.written_as": "peft prefix-tuning adapter"}

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")

    write_folder(out, write)
    return out
