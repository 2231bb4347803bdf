"""What a method is: an operation on some kinds of layers that turns a prompt's state into patch tensors, with typed
parameters that travel as the patch's metadata (iclca.<key>) and as command-line flags. One file per method in this
package, importable without torch (--help lists them at once); methods/__init__.py is the registry the CLI, the metadata check and every method list derive from.

A method object is immutable and holds its parameters: `Compressed(budget=32, split="layers")`. The layers'
handlers (handlers.py) call it where what they do depends on the method:
- softmax layers (`kinds` of SOFTMAX_KINDS): `full_layer_tensors` / `full_layer_shapes` for one full-attention layer,
  or, for a method that `summarises`, `summary_tensors` over all of a model's full-attention layers at once;
- linear-attention layers and transformers caches (`exact`): the state is the patch, nothing method-specific.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import IclcaError, printable
from ..training import SAMPLED, SAMPLED_INPUTS, SCHEDULES, Training

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its field, its command-line flag, its metadata key (iclca.<key>), its type and
    choices, and the help text the CLI shows."""

    field: str
    flag: str
    key: str
    type: type
    help: str
    choices: tuple = ()
    minimum: int | None = None
    was: Any = None  # what a patch without iclca.<key> (written before its default changed) was made with, if known


@dataclass(frozen=True)
class Method:
    """Base of every method. Class attributes say what the method is; dataclass fields are its parameters."""

    name: ClassVar[str]
    help: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # layer kinds it acts on (a model's every layer must be one of them)
    on_cache: ClassVar[str | None] = None  # families whose state is a transformers cache: "all" layers, "attention"
    #                                        (their attention layers, the rest kept exact), or None: not there
    exact: ClassVar[bool] = False  # the patched model equals the prompted one (up to float rounding)
    stackable: ClassVar[bool] = False  # --base-patch: converts on top of a patch of the same method
    summarises: ClassVar[bool] = False  # full-attention layers by summary_tensors, from reference queries
    handler: ClassVar[str | None] = None  # the handler (handlers.py) of every patch of this method; None: the one of
    #                                      the family's state. "weights": updates of the model's weights (lora)
    in_context: ClassVar[bool] = True  # the prompt stands before the query (its positions start at P); False: the
    #                                   model reads the query alone from position 0 (a weight update)
    params: ClassVar[tuple[Param, ...]] = ()
    preference: ClassVar[int]  # the registry's order, where a model takes several methods (the first is its default)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse parameter values the method cannot work with (IclcaError naming the flag)."""
        for p in self.params:
            value = getattr(self, p.field)
            kinds = (int, float) if p.type is float else p.type  # a float parameter takes an int
            if not isinstance(value, kinds) or (isinstance(value, bool) and p.type is not bool):
                raise IclcaError(f"{p.flag} {printable(value, 40)!r} is not a{'n' if p.type is int else ''} "
                                 f"{p.type.__name__}", f"pass {p.flag} {p.choices[0] if p.choices else 'N'}")
            if p.choices and value not in p.choices:
                raise IclcaError(f"{p.flag} {printable(value, 40)!r} is not one of {', '.join(map(str, p.choices))}",
                                 f"pass {p.flag} {self.default(p)} (the default)")
            if p.minimum is not None and value < p.minimum:
                raise IclcaError(f"method {self.name} needs {p.flag} of at least {p.minimum}",
                                 f"pass {p.flag} N: {p.help}")

    @classmethod
    def param(cls, field: str) -> Param:
        """The parameter whose dataclass field is `field`."""
        return next(p for p in cls.params if p.field == field)

    @classmethod
    def default(cls, p: Param) -> Any:
        field = next(f for f in dataclasses.fields(cls) if f.name == p.field)
        return field.default

    def metadata(self) -> dict[str, str]:
        """The patch metadata of the parameters, without the iclca. prefix."""
        return {p.key: str(getattr(self, p.field)) for p in self.params}

    @classmethod
    def from_metadata(cls, extra: dict[str, str], where: str) -> Method:
        """The method a patch's metadata (iclca.<key> without the prefix) describes; a missing key takes what patches
        were made with before the key was written (Param.was), else the default where the method has one."""
        values = {}
        for p in cls.params:
            if p.key not in extra:
                if p.was is not None:
                    values[p.field] = p.was
                elif cls.default(p) is dataclasses.MISSING:
                    raise IclcaError(f"{where} is a {cls.name} patch without iclca.{p.key}", "convert the prompt again")
                continue
            values[p.field] = _parse(p, extra[p.key], where)
            if p.choices and values[p.field] not in p.choices:
                raise IclcaError(f"{where} has iclca.{p.key} {printable(extra[p.key], 40)!r}, not one of "
                                 f"{', '.join(map(str, p.choices))}", "convert the prompt again with this version of iclca")
        try:
            return cls(**values)
        except IclcaError as e:
            raise IclcaError(f"{where}: {e.message}", "convert the prompt again with this version of iclca") from e

    def trained(self, model, patch, tensors: dict[str, torch.Tensor], prompt_ids: list[int],
                progress=None, tokenizer=None, messages: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """The patch tensors after the method's training, if it trains (distill.py); as they are, else. The
        tokenizer, where the caller has it, shapes training inputs as the prompt's lines; `messages`: the prompt is
        this chat conversation (--chat)."""
        return tensors

    def part(self, buffer: str) -> str:
        """What a patch buffer is, for Patch.bytes_by_part: "attention" (keys, values, summaries), "recurrent" (a
        state that does not grow with the prompt) or "weights" (an update of the model's weights)."""
        return "attention" if buffer.startswith(("prompt_", "prefix_")) else "recurrent"

    # ---- softmax layers: one full-attention layer at a time, or all of them (summarises) ----

    def full_layer_tensors(self, captured) -> dict[str, torch.Tensor]:
        """Buffers of one full-attention layer from its Captured keys and values (softmax_layers.Captured)."""
        raise NotImplementedError(f"{self.name} does not act on softmax layers one at a time")

    def summary_tensors(self, captured: dict, prompt_tokens: int) -> dict[str, dict[str, torch.Tensor]]:
        """{layer: {buffer: tensor}} for every full-attention layer captured (with reference queries)."""
        raise NotImplementedError(f"{self.name} does not summarise")

    def full_layer_shapes(self, patch, path: str, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """'<path>.<buffer>' -> shape of one full-attention layer's buffers in a patch of this method."""
        raise NotImplementedError(f"{self.name} does not act on softmax layers")

    def capture_ids(self, prompt_ids: list[int], positions_left: int | None) -> list[int]:
        """What to run to capture the prompt's keys and values (and reference queries): the prompt."""
        return list(prompt_ids)


OLD_INPUTS = 32  # the count of inputs of patches made before --train-count was recorded (32 then, every method)


def training_params(key_prefix: str) -> tuple[Param, ...]:
    """The distillation engine's parameters (training.py), as every trained method takes them: the same fields and
    flags (--steps, --lr, --seed, --train-on, --train-count, --schedule, --time-limit, --held-back, --batch,
    --top-k, --loss-from), metadata keys iclca.<key_prefix>_<...>. A patch made before --train-count and --schedule
    were recorded reads as what made it (OLD_INPUTS inputs, a constant rate)."""
    return (
        Param("steps", "--steps", f"{key_prefix}_steps", int, "training steps (compressed: with --refine)", minimum=1),
        Param("lr", "--lr", f"{key_prefix}_lr", float, "Adam's learning rate (compressed: with --refine)"),
        Param("seed", "--seed", f"{key_prefix}_seed", int, "the training inputs', order's and initial values' seed "
              "(compressed: with --refine)"),
        Param("train_on", "--train-on", f"{key_prefix}_inputs", str, "what training inputs are made of, joined by +: "
              "spans of the prompt re-read (spans), its lines from their start as queries look (lines; spans where "
              "its lines are long), "
              "continuations the prompted model samples (samples), user turns it writes and answers after a --chat "
              "prompt (turns); auto: turns with --chat, else lines (compressed: with --refine)"),
        Param("train_count", "--train-count", f"{key_prefix}_train_count", int, "how many training inputs are made "
              f"(of --train-on's kinds), each step trains on one; 0: {SAMPLED_INPUTS} where the prompted model "
              f"samples them (samples, turns: a generation each), else {Training.inputs} (compressed: with --refine)",
              minimum=0, was=OLD_INPUTS),
        Param("schedule", "--schedule", f"{key_prefix}_schedule", str, "the learning rate over the steps: constant, "
              "or cosine (decayed to 0 along a half cosine) (compressed: with --refine)", choices=SCHEDULES,
              was="constant"),
        Param("time_limit", "--time-limit", f"{key_prefix}_time_limit", float, "stop training after this many "
              "seconds, 0: no limit; a patch stopped early records the steps it took and is not reproducible "
              "(compressed: with --refine)"),
        Param("held_back", "--held-back", f"{key_prefix}_held_back", int, "inputs held back from training, made from "
              "the prompt's lines as the training inputs are but drawn apart (on a prompt of few lines they share "
              "lines with the training inputs): the tensors are kept as they were before training or after the "
              "quarter of the steps where the KL on them is lowest; 0: after the last step (compressed: with "
              "--refine)",
              minimum=0, was=0),
        Param("batch", "--batch", f"{key_prefix}_batch", int, "training inputs per step, their losses averaged "
              "(compressed: with --refine)", minimum=1, was=1),
        Param("top_k", "--top-k", f"{key_prefix}_top_k", int, "the prompted model's most likely next tokens the KL is "
              "taken on, the rest of the vocabulary as one more outcome (compressed: with --refine)", minimum=1,
              was=Training.top_k),
        Param("loss_from", "--loss-from", f"{key_prefix}_loss_from", int, "the first position of each training input "
              "the loss is taken at (0: every position; a weight patch's student reads an input from position 0, "
              "where a model sees one token: 1 leaves that out) (compressed: with --refine)", minimum=0, was=0),
    )


AUTO = "auto"  # --train-on's default: what suits the prompt (Trained.training)


@dataclass(frozen=True)
class Trained(Method):
    """Base of a method trained by the distillation engine (distill.py): the engine's settings as fields (their
    flags and keys: training_params), with its defaults (training.py)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("steps", "lr", "seed", "train_on", "train_count", "schedule", "time_limit",
                                         "held_back", "batch", "top_k", "loss_from")

    steps: int = Training.steps
    lr: float = Training.lr
    seed: int = Training.seed
    train_on: str = AUTO
    train_count: int = 0  # auto: Training.inputs, or SAMPLED_INPUTS where some inputs are sampled
    schedule: str = Training.schedule
    time_limit: float = 0.0  # none
    held_back: int = Training.held_back
    batch: int = Training.batch
    top_k: int = Training.top_k
    loss_from: int = Training.loss_from

    def validate(self) -> None:
        super().validate()
        self.training()

    def training(self, chat: bool = False) -> Training:
        """The distillation engine's settings (Training checks them), for a prompt that is a chat conversation or
        plain text: auto inputs are the user turns the prompted model writes after a chat prompt, else the engine's
        (the prompt's lines); an auto count is the engine's, or SAMPLED_INPUTS where some inputs are sampled."""
        auto = ("turns",) if chat else Training.sources
        sources = auto if self.train_on == AUTO else tuple(self.train_on.split("+"))
        count = self.train_count or (SAMPLED_INPUTS if set(sources) & set(SAMPLED) else Training.inputs)
        return Training(self.steps, self.lr, self.seed, inputs=count,
                        sources=sources, time_limit=self.time_limit or None, held_back=self.held_back,
                        schedule=self.schedule, batch=self.batch, top_k=self.top_k,
                        loss_from=self.loss_from)


def _parse(p: Param, raw: str, where: str):
    """A parameter's value from its metadata string, or an IclcaError naming the key."""
    try:
        if p.type is bool:
            if raw not in ("True", "False"):
                raise ValueError
            return raw == "True"
        if p.type is int and not raw.isdigit():
            raise ValueError
        value = p.type(raw)
        if p.type is float and not math.isfinite(value):
            raise ValueError
        return value
    except ValueError as e:
        raise IclcaError(f"{where} has iclca.{p.key} {printable(raw, 40)!r}, not a{'n' if p.type is int else ''} "
                         f"{p.type.__name__}", "convert the prompt again") from e
