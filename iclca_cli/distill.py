"""Distillation: a patch's tensors trained so that the patched model (the student) says what the prompted model (the
teacher) says, on inputs made from the prompt alone. The teacher is any model that has read the prompt (the exact
prefix patch, so the prompt is not re-read per step); the loss is KL(teacher || student) on the teacher's top-k
next tokens at every position of the training inputs. The engine of trained methods (issue 25: a refined
`compressed`; issue 26: LoRA); it knows nothing of which tensors it trains beyond their names.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .devices import input_device
from .errors import IclcaError


@dataclass(frozen=True)
class Training:
    """How long and how fast to train: Adam steps (one input each), learning rate, seed, teacher's top-k, and the
    longest input (tokens)."""

    steps: int = 100
    lr: float = 1e-2
    seed: int = 0
    top_k: int = 20
    max_len: int = 64

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.top_k < 1 or self.max_len < 2:
            raise IclcaError(f"cannot train with {self}", "pass --steps ≥ 1 and --lr > 0")


def prompt_inputs(prompt_ids: list[int], count: int, max_len: int, seed: int) -> list[list[int]]:
    """`count` inputs made from the prompt alone: spans of it re-read from a random start, of random lengths up to
    max_len, as the queries to come will look things up in it (never the eval queries)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(2, min(max_len, len(prompt_ids)))
        start = rng.randint(0, len(prompt_ids) - length)
        out.append(prompt_ids[start:start + length])
    return out


@torch.no_grad()
def teacher_targets(teacher, inputs: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each input, the teacher's top-k (log-probabilities (T, k), token ids (T, k)) at every position."""
    device = input_device(teacher)
    out = []
    for ids in inputs:
        logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids], device=device)).logits[0].double(), -1)
        top = logp.topk(min(k, logp.shape[-1]), -1)
        out.append((top.values, top.indices))
    return out


def top_k_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens, mean over positions. (T, k), (T, k), (T, V) -> ()"""
    student_logp = torch.log_softmax(student_logits.double(), -1).gather(-1, teacher_ids)  # (T, k)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


@contextmanager
def _frozen(model):
    """The model's parameters without gradients while training patch tensors (their flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def distill(student, names: list[str], targets_of: list[tuple[list[int], tuple[torch.Tensor, torch.Tensor]]],
            training: Training, keep: dict[str, torch.Tensor] | None = None,
            progress: Callable[[int, int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Train the student's buffers `names` (its patch tensors, in place) with Adam, one (input, teacher targets) pair
    per step in a seeded order; entries where keep[name] is True do not move (a summary's sink). Returns the trained
    tensors (detached), in the buffers' dtypes. progress(step, steps, loss)."""
    buffers = {name: student.get_buffer(name) for name in names}
    work = {name: b.detach().double().clone().requires_grad_(True) for name, b in buffers.items()}
    optimiser = torch.optim.Adam(list(work.values()), lr=training.lr)
    order = random.Random(training.seed).choices(range(len(targets_of)), k=training.steps)
    device = input_device(student)
    with _frozen(student):
        for step, i in enumerate(order, start=1):
            ids, (logp, top) = targets_of[i]
            for name, t in work.items():  # the buffers hold the working tensors, cast as the model computes
                path, buffer = name.rsplit(".", 1)
                setattr(student.get_submodule(path), buffer, t.to(buffers[name].dtype))
            loss = top_k_kl(logp, top, student(input_ids=torch.tensor([ids], device=device)).logits[0])
            optimiser.zero_grad()
            loss.backward()
            for name, mask in (keep or {}).items():
                work[name].grad[mask] = 0
            optimiser.step()
            if progress is not None:
                progress(step, training.steps, float(loss))
    trained = {}
    for name, t in work.items():
        path, buffer = name.rsplit(".", 1)
        trained[name] = t.detach().to(buffers[name].dtype)
        student.get_submodule(path).register_buffer(buffer, trained[name].clone())
    return trained


def summary_names_and_sinks(tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The tensors of a compressed patch's summaries (the layers with a `prefix_bias`; a sliding window's keys and
    values, and recurrent states, are exact and stay), and for each a mask of what stays: every head's first entry
    (the prompt's first token, an attention sink) and the entries another head's bias hides."""
    from .ops.compress import PAD_BIAS

    names, keep = [], {}
    for name, bias in tensors.items():
        if not name.endswith(".prefix_bias"):
            continue
        layer = name.removesuffix(".prefix_bias")
        valid = bias > PAD_BIAS / 2  # (Hkv, E): head h's own entries
        sink = valid.float().argmax(-1)  # (Hkv,): the first of each head's entries
        heads = torch.arange(len(bias))
        keep[name] = ~valid
        keep[name][heads, sink] = True
        for part in ("prefix_keys", "prefix_values"):
            t = tensors[f"{layer}.{part}"]  # (Hkv, E, D), or (1, E, D) where the heads share one list
            mask = torch.zeros(t.shape, dtype=torch.bool)
            mask[(heads if len(t) == len(bias) else 0), sink] = True
            keep[f"{layer}.{part}"] = mask
        names += [name, f"{layer}.prefix_keys", f"{layer}.prefix_values"]
    return sorted(names), keep


def refine_summary(model, patch, tensors: dict[str, torch.Tensor], prompt_ids: list[int], training: Training,
                   progress: Callable[[int, int], None] | None = None, inputs: int = 32) -> dict[str, torch.Tensor]:
    """`compressed --refine`: the fitted summary trained toward the model with the prompt's exact patch (its default
    method: prefix, or a hybrid's exact cache), on `inputs` spans of the prompt."""
    import dataclasses

    from .convert import default_method, describe_patch, fill_patch
    from .patch import patched_copy

    exact = describe_patch(model, prompt_ids, patch.prompt_sha256, default_method(model), fingerprint=patch.base_fingerprint)
    teacher = patched_copy(model, fill_patch(model, exact, prompt_ids))
    student = patched_copy(model, dataclasses.replace(patch, tensors=dict(tensors)))
    names, keep = summary_names_and_sinks(tensors)
    drawn = prompt_inputs(prompt_ids, inputs, training.max_len, training.seed)
    targets = list(zip(drawn, teacher_targets(teacher, drawn, training.top_k)))
    step = (lambda done, total, loss: progress(done, total)) if progress is not None else None
    return {**tensors, **distill(student, names, targets, training, keep, step)}
