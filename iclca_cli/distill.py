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
