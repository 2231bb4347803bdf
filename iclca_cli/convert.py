"""Prompt -> patch. For linear attention (method `exact`) the patch is the prompt's final memories."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from .capture import capture_memories
from .errors import IclcaError
from .fingerprint import model_fingerprint
from .patch import Patch, apply_patch, check_method, check_patch_fits, model_family

Progress = Callable[[int, int], None]  # (tokens done, tokens in all)


def check_positions(model, n_tokens: int, what: str) -> None:
    """With a learned position table, position_offset + n_tokens must fit into it."""
    cfg = model.config
    if getattr(cfg, "position_embedding_type", "learned") != "learned":
        return
    offset, max_pos = getattr(cfg, "position_offset", 0), cfg.max_position_embeddings
    if offset + n_tokens > max_pos:
        taken = f" ({offset} already taken by the folded-in prompt)" if offset else ""
        raise IclcaError(
            f"{what} needs {offset + n_tokens} positions but the model has {max_pos}{taken}",
            "shorten the prompt or queries, or use a model with position_embedding_type 'none'",
        )


@torch.no_grad()
def capture_prompt_states(model, prompt_ids: list[int], chunk_size: int = 512, progress: Progress | None = None):
    """Run the prompt through the model from its current memories, chunk by chunk; returns the
    final memories {module path: (S (H,F,Dv), z (H,F))}. Memory use does not grow with the prompt."""
    P = len(prompt_ids)
    check_positions(model, P, "the prompt")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    body = model.base_model  # hidden states only: no (P, vocab) logits
    with capture_memories(model) as captured:
        cache = None
        for start in range(0, P, chunk_size):
            out = body(input_ids=ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            if progress is not None:
                progress(min(start + chunk_size, P), P)
    return {name: (S[0], z[0]) for name, (S, z) in captured.items()}


def convert_exact(
    model,
    prompt_ids: list[int],
    prompt_sha256: str,
    base_patch: Patch | None = None,
    chunk_size: int = 512,
    progress: Progress | None = None,
) -> Patch:
    """The exact ICLCA patch of `prompt_ids` for `model` (on top of `base_patch` if given).

    Stacking: with a base patch the prompt runs from the base patch's memories and positions,
    so the result equals the patch of the concatenated prompts. The base patch is applied to
    `model` in place (pass a copy to keep it plain)."""
    if not prompt_ids:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    fingerprint = model_fingerprint(model)
    extra = {}
    if base_patch is not None:
        check_patch_fits(base_patch, model, fingerprint, "--base-patch")
        if base_patch.method != "exact":
            raise IclcaError(f"--base-patch uses method {base_patch.method!r}", "stack exact patches on exact patches")
        apply_patch(model, base_patch)
        extra["parent_prompt_sha256"] = base_patch.prompt_sha256
    start_tokens = model.config.position_offset
    check_positions(model, len(prompt_ids) + 1, "the prompt and at least one query token")
    states = capture_prompt_states(model, prompt_ids, chunk_size, progress)
    tensors = {}
    for name, (S, z) in states.items():
        tensors[f"{name}.memory_kv"] = S.contiguous()  # (H, F, Dv)
        tensors[f"{name}.memory_k"] = z.contiguous()  # (H, F)
    return Patch(
        tensors=tensors,
        method="exact",
        model_type=model.config.model_type,
        base_fingerprint=fingerprint,
        prompt_sha256=prompt_sha256,
        prompt_tokens=start_tokens + len(prompt_ids),
        position_offset=start_tokens + len(prompt_ids),
        extra=extra,
    )


def convert_prompt(
    model,
    prompt_ids: list[int],
    prompt_sha256: str,
    method: str = "exact",
    order: int = 2,
    base_patch: Patch | None = None,
    chunk_size: int = 512,
    progress: Progress | None = None,
    budget: int = 0,
) -> Patch:
    """The patch of `prompt_ids` for `model` by `method`: exact (linear attention), or for softmax
    decoders (GPT-2, Llama, ...) prefix, taylor (`order`) or compressed (`budget` entries per key/value head)."""
    check_method(model, method)
    if method == "exact":
        return convert_exact(model, prompt_ids, prompt_sha256, base_patch, chunk_size, progress)
    if base_patch is not None:
        raise IclcaError(f"--base-patch is not supported for method {method!r}", "convert the concatenated prompt instead")
    if not prompt_ids:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    check_positions(model, len(prompt_ids) + 1, "the prompt and at least one query token")
    fingerprint = model_fingerprint(model)
    from .decoder import convert_softmax

    tensors = convert_softmax(model, prompt_ids, method, budget, order)
    extra = {"compressed": {"budget": str(budget)}, "taylor": {"taylor_order": str(order)}}.get(method, {})
    if progress is not None:
        progress(len(prompt_ids), len(prompt_ids))
    return Patch(
        tensors=tensors,
        method=method,
        model_type=model_family(model),
        base_fingerprint=fingerprint,
        prompt_sha256=prompt_sha256,
        prompt_tokens=len(prompt_ids),
        position_offset=len(prompt_ids),
        extra=extra,
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
