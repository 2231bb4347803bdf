"""Patch + base checkpoint -> a new Hugging Face checkpoint folder whose bias terms are part of the model (or, for
weight updates such as lora, whose weights hold the update: the stock architecture, no code).

The folder carries one self-contained modeling file (models/merged.py, bundle.py) and an `auto_map`, so it loads
with plain transformers (`trust_remote_code=True`) where iclca is not installed, and through iclca without it;
`iclca.json` records the patch's metadata and tensor shapes.
It is written into a temporary folder beside the target and renamed into place (outputs.py).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from .chat import continuation_ids, merged_template
from .errors import IclcaError
from .families import Family, family_of
from .fingerprint import Fingerprint, as_fingerprint
from .models.merged import auto_classes, modeling_file
from .outputs import PROVENANCE_FILE, check_folder_target, write_folder
from .handlers import handler_for
from .patch import Patch, patched_copy
from .patch_buffers import buffer_specs


def merge_patch(model, tokenizer, patch: Patch, out_dir: str | Path, force: bool = False) -> Path:
    """Write `model` with `patch` folded in to `out_dir`; the patch must already fit the model, which is left as
    it was."""
    out = Path(out_dir).absolute()
    check_folder_target(out, force)
    family = family_of(model)
    merged = merged_model(model, patch, family)
    stock = patch.method.handler == "weights"  # the patch is in the weights: the stock classes, no code
    if not stock:
        filename, source, auto_map = modeling_file(family)
        merged.config.auto_map = auto_map
    provenance = {**patch.metadata(), "tensors": buffer_specs(patch.tensors)}
    tokenizer = chat_tokenizer(tokenizer, None if stock else patch.extra.get("chat_roles"))

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not stock:
            (tmp / filename).write_text(source)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")

    write_folder(out, write)
    return out


def chat_tokenizer(tokenizer, roles: str | None):
    """The tokenizer a merged folder carries: for a --chat patch (baked messages of these roles), a copy whose chat
    template renders a conversation as it continues after them (chat.merged_template), checked on a probe turn."""
    if not roles:
        return tokenizer
    baked = roles.split(",")
    merged = copy.deepcopy(tokenizer)
    merged.chat_template = merged_template(tokenizer.chat_template, baked)
    probe = [{"role": "user", "content": "Hello?"}]
    rendered = merged.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if merged(rendered, add_special_tokens=False).input_ids != continuation_ids(tokenizer, baked, "Hello?"):
        raise IclcaError("this chat template does not render a conversation the same way after the baked prompt",
                         "merge without --chat patches, or use the patch itself with `iclca generate --chat`")
    return merged


@torch.no_grad()
def merged_model(model, patch: Patch, family: Family):
    """The model with the patch folded in, as the family's merged class: a family's own class carries its patch
    already; a stock model becomes its Iclca subclass, whose config records what the subclass needs to rebuild the
    patched model (the patch buffers' shapes and dtypes, and where positions start). A patch of weight updates
    (lora) is folded into a copy of the weights: the stock class."""
    if patch.method.handler == "weights":
        from .lora_layers import fold

        return fold(model, family, patch.tensors)
    patched = patched_copy(model, patch)
    if family.restore_weights:  # weights the model changed in place (it may have run already) back as trained
        backbone = patched.base_model.train()
        getattr(backbone, family.restore_weights)()
        backbone.eval()
    if family.modeling is not None:
        return patched
    classes = auto_classes(family)
    fields = {k: v for k, v in patched.config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version") and not k.startswith("_")}
    fields.update(iclca_method=patch.method.name,
                  **handler_for(family, patch.method).merged_config(patched, family, patch.tensors, patch.position_offset))
    merged = classes["AutoModelForCausalLM"](classes["AutoConfig"](**fields)).to(patched.dtype)
    merged.load_state_dict(patched.state_dict(), strict=True)  # shifted position table, patch buffers included
    for name in patch.tensors:  # each patch buffer in its own dtype again (the cast above gave them the model's)
        path, buffer = name.rsplit(".", 1)
        merged.get_submodule(path).register_buffer(buffer, patched.get_buffer(name).detach().clone())
    return merged.eval()


def read_provenance(folder: str | Path) -> dict[str, str] | None:
    p = Path(folder) / PROVENANCE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def load_merged(folder: str | Path, base_fingerprint: str | Fingerprint, dtype: str = "float32", device: str = "cpu",
                device_map: str | None = None, max_memory: str | None = None):
    """(merged model, method, patch bytes, bytes per element of the model's dtype, the chat roles it was baked after
    or None, the sha256 of the prompt it holds or None for a stacked patch's) of a folder written by merge_patch,
    refused unless it was merged from the base model with `base_fingerprint`."""
    from .loading import load_model
    from .patch import DTYPES

    try:
        provenance = read_provenance(folder)
        method, element = provenance["iclca.method"], DTYPES[provenance["iclca.dtype"]].itemsize
        made_from = provenance["iclca.base_fingerprint"]
        nbytes = sum(math.prod(shape) * DTYPES[kind].itemsize for shape, kind in provenance["tensors"].values())
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise IclcaError(f"{folder} has no readable {PROVENANCE_FILE}: not a folder written by `iclca merge`",
                         "pass --merged DIR from `iclca merge`") from e
    if not as_fingerprint(base_fingerprint).made_for(made_from, provenance.get("iclca.fingerprint_covers")):
        raise IclcaError(f"merged folder {folder} was made from another base model", "pass the --model it was merged from")
    model, _ = load_model(str(folder), dtype, device, device_map=device_map, max_memory=max_memory)
    own = None if "iclca.parent_prompt_sha256" in provenance else provenance.get("iclca.prompt_sha256")
    return model, method, nbytes, element, provenance.get("iclca.chat_roles"), own
