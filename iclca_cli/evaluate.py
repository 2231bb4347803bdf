"""Compare the patched model with the prompted one (base model on prompt+query) and the base model.

`prompted` = base on prompt+query, `patched` = patched or merged model on the query alone,
`base` = base on the query alone. KL is KL(prompted || other) per query position, averaged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .errors import IclcaError
from .families import family_of
from .inputs import Query, encode_continuation, encode_prompt
from .positions import check_positions


@torch.inference_mode()
def next_token_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of the model over ids, one pass, no cache."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]


@torch.inference_mode()
def greedy_continuation(model, ids: list[int], n: int, cache=None) -> list[int]:
    """The n tokens greedy decoding appends to ids (incremental, with the model's cache; `cache`, if
    given, holds tokens that come before ids, e.g. a prompt's)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = []
    for _ in range(n):
        res = model(input_ids=x, cache=cache, use_cache=True)
        cache = res.cache
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return out


def prompt_kv_bytes(config, n_tokens: int, element_size: int) -> int:
    """Bytes of the keys and values a softmax model of this shape would cache for n_tokens prompt tokens (a model
    without attention heads: one hidden_size-wide key and value per layer and token)."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads:  # state-space heads (Mamba2's num_heads, head_dim) are not attention heads
        return 2 * config.num_hidden_layers * n_tokens * config.hidden_size * element_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * n_tokens * kv_heads * head_dim * element_size


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float64. (T, V), (T, V) -> (T,)"""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def evaluate(
    base,
    patched,
    tokenizer,
    prompt_text: str,
    queries: list[Query],
    method: str,
    patch_bytes: int,
    patch_element_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The `iclca eval` report (DESIGN.md keys) over all queries."""
    prompt = encode_prompt(tokenizer, prompt_text)
    if not prompt:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    P = len(prompt)
    family = family_of(base)
    encoded = []
    for n, q in enumerate(queries, start=1):
        q_ids = encode_continuation(tokenizer, q.input)
        t_ids = encode_continuation(tokenizer, q.target) if q.target is not None else None
        if not q_ids:
            raise IclcaError(f"query {n} has no tokens", "every query needs some text")
        check_positions(base, family, P + len(q_ids) + len(t_ids or []), f"prompt + query {n} (+ target)")
        encoded.append((q_ids, t_ids))

    max_diff, kl_patched, kl_base, agree, positions = 0.0, 0.0, 0.0, 0, 0
    correct = {"base": 0, "prompted": 0, "patched": 0}
    with_target = 0
    prompted_s = patched_s = 0.0
    for n, (q_ids, t_ids) in enumerate(encoded, start=1):
        t0 = time.perf_counter()
        prompted_logits = next_token_logits(base, prompt + q_ids)[P:]  # (Tq, V)
        t1 = time.perf_counter()
        patched_logits = next_token_logits(patched, q_ids)  # (Tq, V)
        t2 = time.perf_counter()
        prompted_s += t1 - t0
        patched_s += t2 - t1
        base_logits = next_token_logits(base, q_ids)  # (Tq, V)
        max_diff = max(max_diff, float((prompted_logits - patched_logits).abs().max()))
        kl_patched += float(kl_divergence(prompted_logits, patched_logits).sum())
        kl_base += float(kl_divergence(prompted_logits, base_logits).sum())
        agree += int((prompted_logits.argmax(-1) == patched_logits.argmax(-1)).sum())
        positions += len(q_ids)
        if t_ids is not None:
            with_target += 1
            k = len(t_ids)
            correct["base"] += greedy_continuation(base, q_ids, k) == t_ids
            correct["prompted"] += greedy_continuation(base, prompt + q_ids, k) == t_ids
            correct["patched"] += greedy_continuation(patched, q_ids, k) == t_ids
        if progress is not None:
            progress(n, len(encoded))

    report = {
        "queries": len(encoded),
        "prompt_tokens": P,
        "method": method,
        "max_abs_logit_diff": max_diff,
        "kl_prompted_patched": kl_patched / positions,
        "kl_prompted_base": kl_base / positions,
        "top1_agreement": agree / positions,
    }
    if with_target:
        report["accuracy"] = {k: v / with_target for k, v in correct.items()}
    report["timing"] = {"prompted_s": prompted_s, "patched_s": patched_s}
    report["sizes"] = {"patch_bytes": patch_bytes, "prompt_kv_bytes": prompt_kv_bytes(base.config, P, patch_element_size)}
    return report
