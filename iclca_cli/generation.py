"""What a model says after a query: `iclca generate` and eval's answers. Generation is transformers' own
`generate()` on the patched or merged model (which continues from the prompt's state), on the base model over prompt
+ query (the prompted reference) and on the base model alone, so that the three differ only by the prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from .devices import input_device
from .errors import IclcaError


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token: greedy at temperature 0 (the default), else sampling with top-p, seeded."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise IclcaError(f"--max-new-tokens {self.max_new_tokens} generates nothing", "pass 1 or more")
        if not 0 <= self.temperature < float("inf"):
            raise IclcaError(f"--temperature {self.temperature} is not a temperature", "pass 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise IclcaError(f"--top-p {self.top_p} is not in (0, 1]", "pass e.g. --top-p 0.9")


class _Tokens(BaseStreamer):
    """A streamer that hands each new token id to a callback (generate() first puts the input ids: skipped)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.started = on_token, False

    def put(self, value):
        if not self.started:
            self.started = True
            return
        for t in value.reshape(-1).tolist():
            self.on_token(int(t))

    def end(self):
        pass


@torch.no_grad()
def continuation(model, ids: list[int], sampling: Sampling = Sampling(), pad_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    """The tokens generate() appends to ids (stopping at the model's end-of-sequence token), each handed to
    on_token as it is produced."""
    x = torch.tensor([ids], device=input_device(model))
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                  pad_token_id=pad_token_id if pad_token_id is not None else 0)
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        torch.manual_seed(sampling.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    streamer = _Tokens(on_token) if on_token is not None else None
    out = model.generate(x, attention_mask=torch.ones_like(x), streamer=streamer, **kwargs)
    return out[0, len(ids):].tolist()


class TextStream:
    """Token ids in, the text they add out: decodes the whole continuation each time and hands on what is new, so a
    character split over several tokens appears once whole."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write, self.ids, self.shown = tokenizer, write, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
            return
        self.write(text[len(self.shown):])
        self.shown = text
