"""Helpers every test module may use: tiny random models (CPU, seeded, no network), checkpoints, fresh processes,
CLI result checks. Fixtures are in conftest.py; test modules import only from here, never from each other."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

import iclca_cli.models  # noqa: F401  (registers iclca's classes with the Auto classes)
from iclca_cli import patch as patch_lib
from iclca_cli.convert import convert_prompt
from iclca_cli.families import family_named
from iclca_cli.methods import build
from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM
from iclca_cli.selftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPT = ROOT / "configs/examples/recall-prompt.txt"
EXAMPLE_QUERIES = ROOT / "configs/examples/recall-queries.jsonl"
# A stock transformers decoder of every family's layout, small enough to run in milliseconds; init 0.2 gives logits
# with a real LM's spread (std > 0.5), so that bounds on their differences mean something.
TINY_DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=None,
                    eos_token_id=None, pad_token_id=None)



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


def stock_model(kind: str, dtype=torch.float64, seed=0, model_class=None, **config):
    """A stock transformers model with random weights: `kind` names its classes (LlamaConfig / LlamaForCausalLM)."""
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{kind}Config")(**config)
    # mixture-of-experts layers: torch's grouped matmul takes no float64, the eager loop over experts does
    cls = getattr(transformers, model_class or f"{kind}ForCausalLM")
    return cls._from_config(cfg, experts_implementation="eager").to(dtype).eval()


def make_decoder(kind="Llama", dtype=torch.float64, seed=0, model_class=None, **config):
    """A tiny random stock softmax decoder."""
    return stock_model(kind, dtype, seed, model_class, **{**TINY_DECODER, **config})


def make_recurrent(family: str, dtype=torch.float64, seed=0):
    """A tiny random stock state-space / linear-attention / hybrid model of a family, in its published layout
    (Family.tiny), whose state matters: the model the family's self-test and the scripts build."""
    return tiny_model(family_named(family), dtype, seed)


def make_llama(dtype=torch.float64, seed=0, init=0.2):
    return make_decoder("Llama", dtype, seed, initializer_range=init)


def make_gpt2_model(seed=0, dtype=torch.float64, vocab_size=50257, **kw):
    """A tiny random stock GPT2LMHeadModel (no dropout) whose logits have a real LM's spread."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).to(dtype).eval()


def random_ids(n, vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # (T, V)


def greedy(model, ids, n):
    """The n tokens greedy generate() appends to ids."""
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def convert(model, prompt_ids, method=None, base_patch=None, chunk_size=512, **params):
    """(patched copy of model sharing its weights, patch); the model itself is left as it was. method: a name, with
    its parameters as keywords (budget=8, split="uniform", order=1), or None (the model's default)."""
    if method is not None:
        method = build(method, **params)
    patch = convert_prompt(copy.deepcopy(model), prompt_ids, "0" * 64, method, base_patch, chunk_size)
    return patch_lib.patched_copy(model, patch), patch


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ChatML with a default system turn where a conversation has none, as SmolLM2's template renders it
CHATML_DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                         "<|im_start|>system\nalpha beta<|im_end|>\n{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_checkpoint(model, folder: Path, template: str = CHATML) -> Path:
    """save_checkpoint, with ChatML's special tokens and a chat template (ChatML's): a tiny chat model."""
    from iclca_cli.loading import load_model

    save_checkpoint(model, folder)
    _, tokenizer = load_model(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def save_checkpoint(model, folder: Path) -> Path:
    """Save a test model as a checkpoint folder with a small word tokenizer (ids fit its vocabulary)."""
    from iclca_demo.word_tokenizer import build_word_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four", "five", "six"]
    tokenizer = build_word_tokenizer(words)
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# A fresh interpreter in which importing iclca_cli fails: a merged folder must carry everything it needs.
FRESH_PROCESS = r"""
import importlib.abc, json, sys
class NoIclca(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "iclca_cli":
            raise ImportError("iclca_cli is blocked in this process")
sys.meta_path.insert(0, NoIclca())
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
result = []
for case in json.loads(sys.argv[1]):
    # remote False: a stock checkpoint, loaded without remote code; eager_experts: float64 MoE (grouped_mm takes none)
    extra = {"experts_implementation": "eager"} if case.get("eager_experts") else {}
    model = AutoModelForCausalLM.from_pretrained(case["folder"], trust_remote_code=case.get("remote", True),
                                                 dtype=getattr(torch, case["dtype"]), **extra)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([case["query"]])).logits[0]
        gen = model.generate(torch.tensor([case["query"]]), max_new_tokens=case.get("new_tokens", 16), do_sample=False)
    result.append({"logits": out.tolist(), "generated": gen[0, len(case["query"]):].tolist(),
                   "class": type(model).__module__, "iclca_imported": "iclca_cli" in sys.modules})
print(json.dumps(result))
"""


def run_fresh_process(cases: list[dict], cwd) -> list[dict]:
    """Load each case's merged folder in a fresh process (iclca blocked): its logits, greedy tokens, class."""
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(cases)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_json(result):
    """stdout must be exactly one JSON object."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for f in fragments:
        assert f in lines[0], lines[0]


def load_script(name):
    """A script of scripts/ as a module (scripts/ on the import path, as when the script runs)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
