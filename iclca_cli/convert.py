"""Prompt -> patch, for any family: the method picks the layers' operation (linear_layers for `exact`,
softmax_layers for prefix / compressed / taylor), and the patch records what it was made from."""

from __future__ import annotations

import hashlib

import transformers

from . import cache_layers, linear_layers, softmax_layers
from .cache_layers import Progress
from .errors import IclcaError
from .families import family_of
from .fingerprint import Fingerprint, as_fingerprint, model_fingerprint
from .ops.compress import Options
from .patch import Patch, apply_patch, check_finite, check_method, check_patch_fits, model_dtype_name
from .positions import check_positions
from .selftest import check_family


def default_method(model) -> str:
    """The family's preferred method: exact where every layer keeps a finite state, else prefix (exact)."""
    methods = family_of(model).methods(model.config)
    return methods[0] if methods else "exact"


def convert_prompt(
    model,
    prompt_ids: list[int],
    prompt_sha256: str,
    method: str | None = None,
    order: int = 2,
    base_patch: Patch | None = None,
    chunk_size: int = 512,
    progress: Progress | None = None,
    budget: int = 0,
    fingerprint: str | Fingerprint | None = None,
    options: Options | None = None,
) -> Patch:
    """The patch of `prompt_ids` for `model` by `method` (default: the family's): `exact` (linear attention; on top
    of `base_patch` if given), or for softmax decoders `prefix`, `taylor` (`order`), `compressed` (`budget`
    entries per layer and key/value head on average, fitted as `options` say) or `evict` (`budget` entries kept).

    Stacking: with a base patch the prompt runs from the base patch's states and positions, so the result equals
    the patch of the concatenated prompts. The base patch is applied to `model` in place (pass a copy to keep it
    plain). `fingerprint`: the model's, when the caller knows it (model_fingerprint reads every weight); a
    Fingerprint with the tokenizer's (loading.load_fingerprinted) makes the patch refuse another vocabulary."""
    patch = describe_patch(model, prompt_ids, prompt_sha256, method, order, base_patch, budget, fingerprint, options)
    return fill_patch(model, patch, prompt_ids, base_patch, chunk_size, progress)


def fill_patch(model, patch: Patch, prompt_ids: list[int], base_patch: Patch | None = None, chunk_size: int = 512,
               progress: Progress | None = None) -> Patch:
    """The tensors of a patch describe_patch made for these prompt ids (its method, budget and order), computed by
    running the prompt through `model` (from `base_patch`, applied in place, if given); returns `patch`."""
    method, family = patch.method, family_of(model)
    check_family(family)
    budget, order = int(patch.extra.get("budget", 0)), int(patch.extra.get("taylor_order", 2))
    options = Options.from_metadata(patch.extra)
    if base_patch is not None:
        apply_patch(model, base_patch)
    if family.positions == "cache":
        tensors = cache_layers.convert_cache(model, family, prompt_ids, chunk_size, progress, method, budget, options)
    elif method == "exact":
        tensors = linear_layers.convert_linear(model, family, prompt_ids, chunk_size, progress)
    else:
        tensors = softmax_layers.convert_softmax(model, family, prompt_ids, method, budget, order, options)
        if progress is not None:
            progress(len(prompt_ids), len(prompt_ids))
    check_finite(tensors, "the prompt's state", _overflow_hint(patch.dtype))
    patch.tensors = tensors
    return patch


def _overflow_hint(dtype: str) -> str:
    if dtype == "float16":
        return "float16 overflows on long prompts: convert with --dtype bfloat16 or float32"
    return "the model computes NaN or Inf on this prompt: check the checkpoint, or convert in float32"


def describe_patch(
    model,
    prompt_ids: list[int],
    prompt_sha256: str,
    method: str | None = None,
    order: int = 2,
    base_patch: Patch | None = None,
    budget: int = 0,
    fingerprint: str | Fingerprint | None = None,
    options: Options | None = None,
) -> Patch:
    """The patch convert_prompt will make, without its tensors: its metadata (which tells an existing identical
    output, so a rerun can skip it), after checking that the method, prompt and base patch fit the model."""
    method = method or default_method(model)
    family = check_method(model, method)
    if not prompt_ids:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    fingerprint = as_fingerprint(fingerprint or model_fingerprint(model))
    extra = {"layer_kinds": ",".join(family.layer_kinds(model.config)), "transformers_version": transformers.__version__,
             "fingerprint_covers": fingerprint.covers}
    start = 0
    if base_patch is not None:
        if method != "exact" or base_patch.method != "exact":
            raise IclcaError(f"--base-patch needs exact patches, not {base_patch.method!r} under {method!r}",
                             "stack exact patches on exact patches, or convert the concatenated prompt instead")
        check_patch_fits(base_patch, model, fingerprint, "--base-patch")
        extra["parent_prompt_sha256"] = base_patch.prompt_sha256
        start = base_patch.position_offset
    check_positions(model, family, start + len(prompt_ids) + 1, "the prompt and at least one query token")
    extra.update({"compressed": {"budget": str(budget), **(options or Options()).metadata()},
                  "evict": {"budget": str(budget)}, "taylor": {"taylor_order": str(order)}}.get(method, {}))
    return Patch(
        tensors={},
        method=method,
        model_type=model.config.model_type,
        base_fingerprint=fingerprint.full,
        prompt_sha256=prompt_sha256,
        prompt_tokens=start + len(prompt_ids),
        position_offset=start + len(prompt_ids),
        extra=extra,
        model_dtype=model_dtype_name(model),
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
