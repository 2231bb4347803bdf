"""Prompt -> patch, for any family: the family's handler (handlers.py) runs the prompt and the method (methods/)
makes the layers' tensors; the patch records what it was made from."""

from __future__ import annotations

import hashlib

import transformers

from .cache_layers import Progress
from .errors import IclcaError
from .families import family_of
from .fingerprint import Fingerprint, as_fingerprint, model_fingerprint
from .handlers import handler_for
from .methods import Method, applicable, build
from .patch import Patch, apply_patch, check_finite, check_method, check_patch_fits, model_dtype_name
from .positions import check_positions
from .selftest import check_family


def default_method(model) -> Method:
    """The family's preferred method: exact where every layer keeps a finite state, else prefix (exact)."""
    methods = applicable(family_of(model), model.config)
    if not methods:
        check_method(model, None)  # says which layer kinds no method patches
    return methods[0]()


def as_method(method: Method | str | None, model) -> Method:
    """A Method from what a caller passed: a Method as is, a name with its default parameters, None the model's
    default."""
    if method is None:
        return default_method(model)
    return build(method) if isinstance(method, str) else method


def convert_prompt(
    model,
    prompt_ids: list[int],
    prompt_sha256: str,
    method: Method | str | None = None,
    base_patch: Patch | None = None,
    chunk_size: int = 512,
    progress: Progress | None = None,
    fingerprint: str | Fingerprint | None = None,
    tokenizer=None,
    messages: list[dict] | None = None,
) -> Patch:
    """The patch of `prompt_ids` for `model` by `method` (a Method with its parameters, e.g. `Compressed(budget=32)`,
    or a name; default: the family's): `exact` for layers that keep a finite state (on top of `base_patch` if
    given), or for softmax layers `prefix`, `compressed`, `evict` or `taylor`.

    Stacking: with a base patch the prompt runs from the base patch's states and positions, so the result equals
    the patch of the concatenated prompts. The base patch is applied to `model` in place (pass a copy to keep it
    plain). `fingerprint`: the model's, when the caller knows it (model_fingerprint reads every weight); a
    Fingerprint with the tokenizer's (loading.load_fingerprinted) makes the patch refuse another vocabulary.
    `tokenizer`: the one that made prompt_ids, for trained methods' inputs (the prompt's lines); `messages`: the
    chat conversation prompt_ids render (--chat), for trained methods' inputs (user turns)."""
    patch = describe_patch(model, prompt_ids, prompt_sha256, method, base_patch, fingerprint)
    return fill_patch(model, patch, prompt_ids, base_patch, chunk_size, progress, tokenizer, messages)


def fill_patch(model, patch: Patch, prompt_ids: list[int], base_patch: Patch | None = None, chunk_size: int = 512,
               progress: Progress | None = None, tokenizer=None, messages: list[dict] | None = None) -> Patch:
    """The tensors of a patch describe_patch made for these prompt ids, computed by running the prompt through
    `model` (from `base_patch`, applied in place, if given); returns `patch`. progress(done, total[, note])."""
    family = family_of(model)
    check_family(family)
    if base_patch is not None:
        apply_patch(model, base_patch)
    tensors = handler_for(family, patch.method).convert(model, family, prompt_ids, patch.method, chunk_size, progress)
    tensors = patch.method.trained(model, patch, tensors, prompt_ids, progress, tokenizer, messages)
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
    method: Method | str | None = None,
    base_patch: Patch | None = None,
    fingerprint: str | Fingerprint | None = None,
) -> Patch:
    """The patch convert_prompt will make, without its tensors: its metadata (which tells an existing identical
    output, so a rerun can skip it), after checking that the method, prompt and base patch fit the model."""
    method = as_method(method, model)
    family = check_method(model, method)
    if not prompt_ids:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    fingerprint = as_fingerprint(fingerprint or model_fingerprint(model))
    extra = {"layer_kinds": ",".join(family.layer_kinds(model.config)), "transformers_version": transformers.__version__,
             "fingerprint_covers": fingerprint.covers}
    start = 0
    if base_patch is not None:
        if not (method.stackable and type(base_patch.method) is type(method)):
            raise IclcaError(f"--base-patch stacks patches of a method that stacks, of the same method: not a "
                             f"{base_patch.method.name!r} patch under {method.name!r}",
                             "stack exact patches on exact patches, or convert the concatenated prompt instead")
        check_patch_fits(base_patch, model, fingerprint, "--base-patch")
        extra["parent_prompt_sha256"] = base_patch.prompt_sha256
        start = base_patch.position_offset
    check_positions(model, family, start + len(prompt_ids) + 1, "the prompt and at least one query token")
    return Patch(
        tensors={},
        method=method,
        model_type=model.config.model_type,
        base_fingerprint=fingerprint.full,
        prompt_sha256=prompt_sha256,
        prompt_tokens=start + len(prompt_ids),
        position_offset=start + len(prompt_ids) if method.in_context else 0,
        extra=extra,
        model_dtype=model_dtype_name(model),
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
