"""How a trained method trains (distill.py runs it): steps, learning rate, seed, and what the inputs are made of.
Importable without torch, so that a method's parameters are checked where the command line is read."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import IclcaError

SOURCES = ("spans", "lines", "samples", "turns")  # what training inputs are made of (distill.training_inputs)
SAMPLED = ("samples", "turns")  # those the prompted model writes (a generation each), the others re-read the prompt
SAMPLED_INPUTS = 32  # how many inputs by default where some are sampled (Training.inputs: where none is)
SCHEDULES = ("constant", "cosine")  # the learning rate over the steps: as given, or decayed to 0 along a half cosine


@dataclass(frozen=True)
class Training:
    """Adam steps (`batch` inputs each, their losses averaged), learning rate, seed, the teacher's top-k, the
    longest input (tokens), how many inputs, what they are made of (SOURCES, shared out evenly), a time limit in
    seconds (training stops there; None: the steps alone), how many inputs are held back to choose the step kept (0:
    the last), the learning rate's schedule over the steps (SCHEDULES), inputs per step, and the first position of
    each input the loss counts."""

    steps: int = 100  # the defaults of every trained method, chosen on development tasks (docs/smollm2.md, lora.md)
    lr: float = 2e-3
    seed: int = 0
    top_k: int = 20
    max_len: int = 64
    inputs: int = 128
    sources: tuple[str, ...] = ("lines",)
    time_limit: float | None = None
    held_back: int = 0  # inputs made from the prompt's lines, drawn apart, never trained on: the step where their
    # KL is lowest is kept
    schedule: str = "cosine"
    batch: int = 1
    loss_from: int = 0  # the first position of each input the loss is taken at (the last is always taken)

    def __post_init__(self):
        if self.steps < 1:
            raise IclcaError(f"--steps {self.steps} trains nothing", "pass --steps 1 or more")
        if not self.lr > 0:
            raise IclcaError(f"--lr {self.lr} is not a learning rate", "pass --lr 0.002, or another positive number")
        if not self.sources or set(self.sources) - set(SOURCES):
            raise IclcaError(f"--train-on {'+'.join(self.sources)!r} is not auto or made of {', '.join(SOURCES)}",
                             "pass e.g. --train-on lines+samples")
        if self.time_limit is not None and not self.time_limit > 0:
            raise IclcaError(f"--time-limit {self.time_limit} is not a number of seconds", "pass 0 (none) or more")
        if self.held_back < 0:
            raise IclcaError(f"--held-back {self.held_back} is not a number of inputs", "pass 0 (none) or more")
        if self.schedule not in SCHEDULES:
            raise IclcaError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}",
                             "pass --schedule constant or --schedule cosine")
        if self.loss_from < 0:
            raise IclcaError(f"--loss-from {self.loss_from} is not a position", "pass 0 (every position) or more")
        if self.batch < 1:
            raise IclcaError(f"--batch {self.batch} trains on nothing", "pass --batch 1 or more")
        if self.top_k < 1 or self.max_len < 2 or self.inputs < 1:
            raise IclcaError(f"cannot train with {self}", "train on at least one input of two tokens, top-k 1 or more")
