"""Compare the patched model with the prompted one (base model on prompt+query) and the base model.

`prompted` = base on prompt+query, `patched` = patched or merged model on the query alone,
`base` = base on the query alone. KL is KL(prompted || other) per query position, averaged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch

from . import chat
from .devices import input_device
from .errors import IclcaError
from .families import family_of
from .inputs import Query, encode_continuation
from .patch import model_dtype_name
from .positions import check_positions


@torch.inference_mode()
def next_token_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of the model over ids, one pass, no cache."""
    device = input_device(model)
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]


@torch.inference_mode()
def score_and_continue(model, ids: list[int], n: int, cache=None) -> tuple[torch.Tensor, list[int]]:
    """(logits (T, V) over ids, the n tokens greedy decoding appends to ids): one pass over ids, then one per new
    token, with the model's cache; `cache`, if given, holds tokens that come before ids (a prompt's)."""
    device = input_device(model)
    res = model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
    logits, out = res.logits[0], []
    carried = "cache" if getattr(res, "cache", None) is not None else "state"  # RWKV carries a `state`
    while len(out) < n:
        out.append(int(res.logits[0, -1].argmax()))
        if len(out) < n:
            res = model(input_ids=torch.tensor([[out[-1]]], device=device), use_cache=True,
                        **{carried: getattr(res, carried)})
    return logits, out


def greedy_continuation(model, ids: list[int], n: int, cache=None) -> list[int]:
    """The n tokens greedy decoding appends to ids (see score_and_continue)."""
    return score_and_continue(model, ids, n, cache)[1] if n else []


class PromptedReference:
    """The base model on prompt + query, for one query after another. Where the family's stock model continues from
    a cache correctly (Family.stock_cache_continues), the prompt is read once and each query continues from a copy
    of its cache; else each query re-reads the prompt. Both give the same logits up to float rounding (a test)."""

    def __init__(self, base, prompt: list[int], reuse_cache: bool | None = None):
        self.base, self.prompt = base, prompt
        self.reuse = family_of(base).stock_cache_continues if reuse_cache is None else reuse_cache
        self.cache = None
        if self.reuse:
            with torch.inference_mode():
                device = input_device(base)
                self.cache = base(input_ids=torch.tensor([prompt], device=device), use_cache=True,
                                  logits_to_keep=1).cache

    def run(self, q_ids: list[int], n_greedy: int) -> tuple[torch.Tensor, list[int]]:
        """(logits (Tq, V) over the query's positions, the n_greedy tokens greedy decoding appends to the query)."""
        if self.reuse:
            return score_and_continue(self.base, q_ids, n_greedy, copy.deepcopy(self.cache))
        logits, out = score_and_continue(self.base, self.prompt + q_ids, n_greedy)
        return logits[len(self.prompt):], out


def prompt_kv_bytes(config, n_tokens: int, element_size: int) -> int:
    """Bytes of the keys and values a softmax model of this shape would cache for n_tokens prompt tokens (a model
    without attention heads: one hidden_size-wide key and value per layer and token)."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads:  # state-space heads (Mamba2's num_heads, head_dim) are not attention heads
        return 2 * config.num_hidden_layers * n_tokens * config.hidden_size * element_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * n_tokens * kv_heads * head_dim * element_size


def top1_agrees(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(T,) bool: other's top-1 token is a top-1 token of reference (an exact tie at the top, common in bfloat16,
    lets either token count). (T, V), (T, V)"""
    picked = reference.gather(-1, other.argmax(-1, keepdim=True)).squeeze(-1)  # (T,)
    return picked == reference.amax(-1)


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
    reuse_cache: bool | None = None,
    float32_base=None,
    chat_messages: list[dict] | None = None,
    answer_tokens: int = 16,
    served_head: list[int] = (),
) -> dict:
    """The `iclca eval` report (DESIGN.md keys) over all queries. reuse_cache: read the prompt once for the prompted
    reference (default: where the family allows, PromptedReference). float32_base: the base model in float32, for a
    run in reduced precision: the report's `precision` then holds the yardstick, how far the prompted model in this
    dtype is from itself in float32, and max_abs_logit_diff as a multiple of it. chat_messages: the prompt as a
    conversation's start (chat.py; prompt_text is then unused), each query a user turn. answers: each model's
    greedy continuation, as long as the query's target, or `answer_tokens` where it has none. served_head: what the
    patched and the base model read before each query (a weight patch of a chat prompt: the chat template's own
    start, as a server renders a query); their logits are the query's."""
    prompt, encode_query = chat.encoders(tokenizer, prompt_text, chat_messages)
    if not prompt:
        raise IclcaError("the prompt has no tokens", "write the demonstrations into the prompt file")
    P = len(prompt)
    family = family_of(base)
    encoded = []
    for n, q in enumerate(queries, start=1):
        q_ids = encode_query(q.input)
        t_ids = encode_continuation(tokenizer, q.target) if q.target is not None else None
        if not q_ids:
            raise IclcaError(f"query {n} has no tokens", "every query needs some text")
        check_positions(base, family, P + len(q_ids) + len(t_ids or []), f"prompt + query {n} (+ target)")
        encoded.append((q_ids, t_ids))

    max_diff, kl_patched, kl_base, agree, positions = 0.0, 0.0, 0.0, 0, 0
    correct = {"base": 0, "prompted": 0, "patched": 0}
    with_target = 0
    t0 = time.perf_counter()
    prompted = PromptedReference(base, prompt, reuse_cache)
    prompted_s, patched_s = time.perf_counter() - t0, 0.0  # the prompt's one read counts once
    prompted32 = PromptedReference(float32_base, prompt, reuse_cache) if float32_base is not None else None
    yardstick, agree32 = 0.0, 0
    nonfinite = {"prompted": 0, "patched": 0, "base": 0}
    answers = []
    for n, (q_ids, t_ids) in enumerate(encoded, start=1):
        t0 = time.perf_counter()
        k = len(t_ids) if t_ids is not None else answer_tokens  # greedy tokens: the target's length
        prompted_logits, prompted_greedy = prompted.run(q_ids, k)  # (Tq, V)
        t1 = time.perf_counter()
        patched_logits, patched_greedy = score_and_continue(patched, [*served_head, *q_ids], k)
        t2 = time.perf_counter()
        prompted_s += t1 - t0
        patched_s += t2 - t1
        base_logits, base_greedy = score_and_continue(base, [*served_head, *q_ids], k)
        patched_logits, base_logits = patched_logits[len(served_head):], base_logits[len(served_head):]  # (Tq, V)
        if prompted32 is not None:
            reference = prompted32.run(q_ids, 0)[0]  # (Tq, V) float32
            yardstick = max(yardstick, float((prompted_logits.float() - reference).abs().max()))
            agree32 += int(top1_agrees(reference, prompted_logits.float()).sum())
        for name, value in (("prompted", prompted_logits), ("patched", patched_logits), ("base", base_logits)):
            nonfinite[name] += int((~torch.isfinite(value)).any(-1).sum())  # positions with NaN or Inf
        # torch's max keeps NaN (Python's max() would drop it): a NaN anywhere makes the difference NaN
        max_diff = float(torch.tensor([max_diff, float((prompted_logits.float() - patched_logits.float()).abs().max())]).max())
        kl_patched += float(kl_divergence(prompted_logits, patched_logits).sum())
        kl_base += float(kl_divergence(prompted_logits, base_logits).sum())
        agree += int(top1_agrees(prompted_logits, patched_logits).sum())
        positions += len(q_ids)
        answer = {"input": queries[n - 1].input, **({"target": queries[n - 1].target} if t_ids is not None else {})}
        answers.append({**answer, **{who: tokenizer.decode(ids, skip_special_tokens=True) for who, ids in
                                     (("prompted", prompted_greedy), ("patched", patched_greedy), ("base", base_greedy))}})
        if t_ids is not None:
            with_target += 1
            correct["base"] += base_greedy == t_ids
            correct["prompted"] += prompted_greedy == t_ids
            correct["patched"] += patched_greedy == t_ids
        if progress is not None:
            progress(n, len(encoded))

    report = {
        "queries": len(encoded),
        "prompt_tokens": P,
        "method": getattr(method, "name", method),
        "max_abs_logit_diff": max_diff,
        "kl_prompted_patched": kl_patched / positions,
        "kl_prompted_base": kl_base / positions,
        "top1_agreement": agree / positions,
    }
    if with_target:
        report["accuracy"] = {k: v / with_target for k, v in correct.items()}
    if prompted32 is not None:
        report["precision"] = {
            "dtype": model_dtype_name(base),
            "prompted_vs_float32_max_abs_logit_diff": yardstick,
            "prompted_vs_float32_top1_agreement": agree32 / positions,
            # a yardstick of 0 (a model the dtype cannot change) leaves the ratio undefined unless both are 0
            "max_abs_logit_diff_over_yardstick": max_diff / yardstick if yardstick else (0.0 if max_diff == 0 else None),
        }
    report["nonfinite_positions"] = nonfinite
    report["timing"] = {"prompted_s": prompted_s, "patched_s": patched_s}
    report["sizes"] = {"patch_bytes": patch_bytes, "prompt_kv_bytes": prompt_kv_bytes(base.config, P, patch_element_size)}
    report["answers"] = answers
    return {k: _json_safe(v) for k, v in report.items()}


def _json_safe(value):
    """NaN and Inf, which JSON cannot hold, as None (null); nonfinite_positions says where they came from."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def missed_gates(report: dict, max_abs_logit_diff: float | None = None, min_top1_agreement: float | None = None,
                 ) -> list[str]:
    """The thresholds a report misses; NaN or Inf in the patched or prompted logits misses every one given."""
    bad = report["nonfinite_positions"]["patched"] + report["nonfinite_positions"]["prompted"]
    gates = {"max_abs_logit_diff": (max_abs_logit_diff, lambda v, t: v <= t, ">"),
             "top1_agreement": (min_top1_agreement, lambda v, t: v >= t, "<")}
    missed = []
    for key, (threshold, ok, sign) in gates.items():
        if threshold is None:
            continue
        value = report[key]
        if bad or value is None:
            missed.append(f"{key}: the logits hold NaN or Inf at {bad} positions")
        elif not ok(value, threshold):
            missed.append(f"{key} {value:.3g} {sign} {threshold:g}")
    return missed
