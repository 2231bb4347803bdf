"""The patch file: one .safetensors of per-module tensors plus string metadata (DESIGN.md, "Patch file")."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import __version__
from .devices import shared_memo
from .dtypes import DTYPE_NAMES
from .errors import IclcaError, IclcaWarning, printable
from .families import Family, family_of
from .fingerprint import WITH_TOKENIZER, WITHOUT_TOKENIZER, Fingerprint, as_fingerprint
from .handlers import handler_for
from .methods import Method, all_methods, applicable, from_metadata, metadata_keys
from .positions import check_positions

FORMAT_VERSION = "1"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
DIGEST = "iclca.tensors_sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = (
    "format", "iclca.format_version", "iclca.method", "iclca.model_type", "iclca.base_fingerprint",
    "iclca.prompt_sha256", "iclca.prompt_tokens", "iclca.position_offset", "iclca.dtype", "iclca.version",
)


@dataclass
class Patch:
    """What a prompt became: tensors named `<module path>.<name>` and where the query starts."""

    tensors: dict[str, torch.Tensor]
    method: Method  # with its parameters
    model_type: str
    base_fingerprint: str
    prompt_sha256: str
    prompt_tokens: int  # tokens folded in, stacked prompts included
    position_offset: int  # position of the query's first token
    extra: dict[str, str] = field(default_factory=dict)  # more provenance, stored as iclca.<key>
    model_dtype: str | None = None  # the dtype the model ran in (tensors may keep others: float32 SSM states)

    @property
    def dtype(self) -> str:
        return self.model_dtype or str(next(iter(self.tensors.values())).dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bytes_by_part(self) -> dict[str, int]:
        """{"recurrent": bytes of states that do not grow with the prompt, "attention": bytes of keys, values or
        summaries of attention layers, and "weights" for updates of the model's weights (lora)}: what a hybrid's
        patch spends where."""
        parts = {"recurrent": 0, "attention": 0}
        for name, t in self.tensors.items():
            part = self.method.part(name.rsplit(".", 1)[-1])
            parts[part] = parts.get(part, 0) + t.numel() * t.element_size()
        return parts

    def metadata(self) -> dict[str, str]:
        """The file's metadata; with tensors, their digest too (iclca.tensors_sha256)."""
        meta = {
            "format": "pt",
            "iclca.format_version": FORMAT_VERSION,
            "iclca.method": self.method.name,
            "iclca.model_type": self.model_type,
            "iclca.base_fingerprint": self.base_fingerprint,
            "iclca.prompt_sha256": self.prompt_sha256,
            "iclca.prompt_tokens": str(self.prompt_tokens),
            "iclca.position_offset": str(self.position_offset),
            "iclca.dtype": self.dtype,
            "iclca.version": __version__,
        }
        meta.update({f"iclca.{k}": v for k, v in sorted({**self.extra, **self.method.metadata()}.items())})
        if self.tensors:
            meta[DIGEST] = tensors_sha256(self.tensors)
        return meta


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what a patch's data must verify to."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], what: str, hint: str = "convert the prompt again") -> None:
    """Refuse tensors holding NaN or Inf: a patch of them would make every output NaN or wrong, silently."""
    for name, t in sorted(tensors.items()):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise IclcaError(f"{what} tensor {name} holds {bad} non-finite values (NaN or Inf)", hint)


def save_patch(patch: Patch, path: str | Path) -> int:
    """Write the patch atomically (outputs.write_file); returns its size in bytes. Non-finite tensors are refused."""
    from .outputs import write_file

    path = Path(path)
    if not path.parent.is_dir():
        raise IclcaError(f"output folder does not exist: {path.parent}", "create it first, or choose another --out")
    check_finite(patch.tensors, "the patch")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sorted(patch.tensors.items())}
    write_file(path, canonical_safetensors(tensors, patch.metadata()))
    return path.stat().st_size


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header in sorted key order, so equal inputs give equal bytes
    (safetensors itself writes the header's maps in no fixed order)."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def model_dtype_name(model: torch.nn.Module) -> str:
    """The dtype a model computes in, as patches name it: "bfloat16"."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def read_header(path: str | Path) -> tuple[dict[str, str], int] | None:
    """(metadata, number of tensors) of a readable safetensors file, reading only its header; else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, len(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def load_patch(path: str | Path) -> Patch:
    """Read and validate a patch file; every problem becomes an IclcaError naming it."""
    path = Path(path)
    if not path.is_file():
        raise IclcaError(f"patch file not found: {path}", "make one with `iclca convert PROMPT --model M --out PATCH`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IclcaError(
            f"{path} is not a readable safetensors patch ({str(e).splitlines()[0][:120]})",
            "the file may be truncated or of another kind; convert the prompt again",
        ) from e
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise IclcaError(f"{path} lacks patch metadata {', '.join(missing)}", "only files written by `iclca convert` are patches")
    if meta["iclca.format_version"] != FORMAT_VERSION:
        raise IclcaError(
            f"{path} has patch format {meta['iclca.format_version']!r}; this iclca reads {FORMAT_VERSION!r}",
            "convert the prompt again with this version of iclca",
        )
    prompt_tokens, offset = _consistent(path, meta)
    if not tensors:
        raise IclcaError(f"{path} holds no tensors", "convert the prompt again")
    if any(t.dtype not in DTYPES.values() for t in tensors.values()):
        raise IclcaError(f"{path} holds tensors of an unsupported dtype", f"patches are {' or '.join(DTYPES)}")
    if DIGEST in meta and meta[DIGEST] != tensors_sha256(tensors):  # patches before iclca 0.2 have no digest
        raise IclcaError(f"{path}'s tensors do not match the digest in its metadata (changed or damaged since written)",
                         "convert the prompt again")
    known = {k.removeprefix("iclca.") for k in (*_REQUIRED, DIGEST)} | {"format"}
    extra = {k.removeprefix("iclca."): v for k, v in meta.items() if k.startswith("iclca.") and k.removeprefix("iclca.") not in known}
    method = from_metadata(meta["iclca.method"], extra, str(path))
    if offset != (prompt_tokens if method.in_context else 0):
        raise IclcaError(f"{path} has iclca.position_offset {offset} for a {method.name} patch of {prompt_tokens} "
                         "prompt tokens", "convert the prompt again")
    extra = {k: v for k, v in extra.items() if k not in metadata_keys()}  # the method holds its own
    return Patch(
        tensors=tensors,
        method=method,
        model_type=meta["iclca.model_type"],
        base_fingerprint=meta["iclca.base_fingerprint"],
        prompt_sha256=meta["iclca.prompt_sha256"],
        prompt_tokens=prompt_tokens,
        position_offset=offset,
        extra=extra,
        model_dtype=meta["iclca.dtype"],
    )


def _consistent(path: Path, meta: dict[str, str]) -> tuple[int, int]:
    """(prompt tokens, position offset) of metadata whose values agree with each other, or an IclcaError."""
    tokens, offset = meta["iclca.prompt_tokens"], meta["iclca.position_offset"]
    if not (tokens.isdigit() and offset.isdigit()):
        raise IclcaError(f"{path} has non-integer token counts in its metadata", "convert the prompt again")
    if int(tokens) < 1 or int(offset) not in (int(tokens), 0):
        raise IclcaError(f"{path} has iclca.position_offset {offset} for iclca.prompt_tokens {tokens}: the query "
                         "starts right after the prompt's tokens (or at 0, after a weight update)",
                         "convert the prompt again")
    if meta["iclca.dtype"] not in DTYPES:
        raise IclcaError(f"{path} has iclca.dtype {printable(meta['iclca.dtype'], 40)!r}",
                         f"patches are {' or '.join(DTYPES)}; convert the prompt again")
    for key in ("iclca.base_fingerprint", "iclca.prompt_sha256"):
        if not _SHA256.match(meta[key]):
            raise IclcaError(f"{path} has a {key} that is not a sha256 digest", "convert the prompt again")
    return int(tokens), int(offset)


def check_method(model, method: Method | None) -> Family:
    """The model's family, or an IclcaError if the method does not apply to every layer of the model (None: if no
    method does)."""
    family = family_of(model)
    methods = applicable(family, model.config)
    if not methods:
        kinds = sorted(set(family.layer_kinds(model.config)))
        raise IclcaError(f"{family.model_type!r} models have layers of kinds {', '.join(kinds)}, which no method of "
                         "iclca patches together yet", f"iclca's methods: {', '.join(all_methods())}")
    if type(method) not in methods:
        raise IclcaError(f"method {method.name!r} does not apply to {family.model_type!r} models",
                         f"use --method {' or '.join(m.name for m in methods)}")
    return family


def expected_shapes(model, family: Family, patch: Patch) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a patch of this method must have for this model."""
    return handler_for(family, patch.method).expected_shapes(model, family, patch)


def check_patch_fits(patch: Patch, model: torch.nn.Module, fingerprint: str | Fingerprint,
                     patch_name: str = "patch") -> None:
    """Refuse a patch made for another model, model type or method, with tensors that do not fit the model, or
    with NaN or Inf in them."""
    check_finite(patch.tensors, patch_name)
    if patch.model_type != model.config.model_type:
        raise IclcaError(
            f"{patch_name} is for a {patch.model_type!r} model, this model is {model.config.model_type!r}",
            "use the model the patch was converted with",
        )
    family = check_method(model, patch.method)
    model_dtype = model_dtype_name(model)
    lossy = {patch.dtype, model_dtype} & {"bfloat16", "float16"}  # weights rounded to another precision differ
    fingerprint = as_fingerprint(fingerprint)
    made_for = fingerprint.made_for(patch.base_fingerprint, patch.extra.get("fingerprint_covers"))
    if not made_for and patch.dtype != model_dtype and lossy:
        raise IclcaError(f"{patch_name} was converted in {patch.dtype}, this model runs in {model_dtype}",
                         f"pass --dtype {patch.dtype} (the model's weights in another precision are another model)")
    if not made_for:
        raise IclcaError(
            f"{patch_name} was made for model {patch.base_fingerprint[:12]}, this model is {fingerprint.full[:12]} "
            f"(fingerprints over {patch.extra.get('fingerprint_covers', WITHOUT_TOKENIZER)})",
            "use the same --model, with the same tokenizer, as `iclca convert` did (`iclca inspect PATCH` shows its "
            "fingerprint)",
        )
    if WITH_TOKENIZER != patch.extra.get("fingerprint_covers", WITHOUT_TOKENIZER) and fingerprint.tokenizer:
        warnings.warn(f"{patch_name} was made before iclca fingerprinted the tokenizer: its config and weights match "
                      "this model, its tokenizer is not checked (convert the prompt again to check it)",
                      IclcaWarning, stacklevel=2)
    want = expected_shapes(model, family, patch)
    for name in sorted(set(want) | set(patch.tensors)):
        if name not in want:
            raise IclcaError(f"{patch_name} tensor {name} has no place in this model", "convert the prompt again for this model")
        if name not in patch.tensors:
            raise IclcaError(f"{patch_name} lacks tensor {name}", "convert the prompt again for this model")
        if tuple(patch.tensors[name].shape) != want[name]:
            raise IclcaError(
                f"{patch_name} tensor {name} has shape {tuple(patch.tensors[name].shape)}, the model expects {want[name]}",
                "convert the prompt again for this model",
            )
    check_positions(model, family, patch.position_offset + 1, f"{patch_name}'s prompt and one query token")


def patched_copy(model: torch.nn.Module, patch: Patch) -> torch.nn.Module:
    """A patched model beside `model`, sharing its weights: modules, buffers and config are copied,
    parameters are not (patching never writes to them), so a 7B model is not held twice. A family whose model
    changes its own weights in place (RWKV rescales them on its first forward in eval mode) gets a full copy."""
    patched = shared_copy(model)
    apply_patch(patched, patch)
    return patched


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that shares its parameters (see patched_copy), to patch without touching `model`."""
    return copy.deepcopy(model, memo=shared_memo(model) if family_of(model).shares_weights else None)


@torch.no_grad()
def apply_patch(model: torch.nn.Module, patch: Patch) -> None:
    """Make the patch part of the model (in place): the layers its method acts on take its tensors, and queries
    start at its position offset."""
    from .selftest import check_family

    family = family_of(model)
    check_family(family)
    check_finite(patch.tensors, "the patch")
    handler_for(family, patch.method).attach(model, family, patch.tensors, patch.position_offset)
