"""Tiny random models and helpers shared by the tests (CPU only, no network, seeded)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import iclca_cli  # noqa: F401  (registers iclca_linear with the Auto classes)
from iclca_cli.cli import app
from iclca_cli.convert import convert_exact
from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM
from iclca_cli import patch as patch_lib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPT = ROOT / "configs/examples/recall-prompt.txt"
EXAMPLE_QUERIES = ROOT / "configs/examples/recall-queries.jsonl"


def make_linear_model(seed=0, dtype=torch.float64, feature_map="elu+1", position_embedding_type="learned", **kw):
    """A tiny random iclca_linear LM in eval mode."""
    cfg = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=640,
               feature_map=feature_map, position_embedding_type=position_embedding_type, chunk_size=64,
               initializer_range=0.5)  # logits with std ~2.7, the scale of a real LM's
    cfg.update(kw)
    torch.manual_seed(seed)
    model = IclcaLinearForCausalLM(IclcaLinearConfig(**cfg)).to(dtype).eval()
    # Random init leaves LayerNorm at identity and biases at zero; perturb them so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(n, vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # (T, V)


def patched_copy(model, prompt_ids, chunk_size=512, base_patch=None):
    """(patched copy of model sharing its weights, patch) after converting prompt_ids with the library."""
    patch = convert_exact(copy.deepcopy(model), prompt_ids, "0" * 64, base_patch=base_patch, chunk_size=chunk_size)
    return patch_lib.patched_copy(model, patch), patch


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cli():
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    return run


def save_checkpoint(model, folder: Path) -> Path:
    """Save a test model as a checkpoint folder with a small word tokenizer (ids fit its vocabulary)."""
    from iclca_cli.word_tokenizer import build_word_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four", "five", "six"]
    tokenizer = build_word_tokenizer(words)
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_gpt2_model(seed=0, dtype=torch.float64, vocab_size=50257, **kw):
    """A tiny random stock GPT2LMHeadModel (no dropout) whose logits have a real LM's spread."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).to(dtype).eval()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from iclca_cli.gpt2_tokenizer import offline_gpt2_tokenizer

    return offline_gpt2_tokenizer()
