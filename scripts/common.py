"""What the scripts share: the repository on the import path, the random models they build, the methods they name,
and markdown tables. (Importing this puts the repository first on sys.path, so a checkout runs without install.)"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iclca_cli.convert import convert_prompt  # noqa: E402
from iclca_cli.patch import patched_copy  # noqa: E402


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_linear(seed: int = 0, dtype=torch.float32, **config):
    """An iclca_linear model with random weights (seeded); `config` overrides the demo's width (128, 4 heads, 2
    layers)."""
    from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    return IclcaLinearForCausalLM(IclcaLinearConfig(**{**cfg, **config})).to(dtype).eval()


def random_gpt2(layers: int = 12, dtype=torch.float32, seed: int = 0):
    """GPT-2 small's shape (124M parameters with 12 layers), GPT-2's initialisation, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def random_decoder(kind: str = "Llama", dtype=torch.float64, seed: int = 0, **config):
    """A tiny stock transformers decoder with random weights (`kind` names its classes: LlamaConfig /
    LlamaForCausalLM): 2 layers, width 64, 4 query heads sharing 2 key/value heads, init 0.2 (logits with a real
    LM's spread)."""
    import transformers

    tiny = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(**{**tiny, **config})
    return getattr(transformers, f"{kind}ForCausalLM")(config).to(dtype).eval()


def convert_by(model, prompt_ids: list[int], name: str, chunk_size: int = 512, fingerprint: str | None = None,
               tokenizer=None):
    """The patch of a method named as in the tables (a spec: exact, prefix, taylor1, compressed-32, evict-P/3,
    compressed-P/3:own:kmeans:uniform; methods.from_spec), converted on `model` itself (the tokenizer: for a trained
    method's line inputs)."""
    from iclca_cli.methods import from_spec

    return convert_prompt(model, prompt_ids, "-", from_spec(name, len(prompt_ids)), chunk_size=chunk_size,
                          fingerprint=fingerprint, tokenizer=tokenizer)


def patched_by(model, prompt_ids: list[int], name: str, chunk_size: int = 512):
    """(patched copy of model sharing its weights, patch) for a method named as in the tables."""
    patch = convert_by(copy.deepcopy(model), prompt_ids, name, chunk_size)
    return patched_copy(model, patch), patch


def cli(*args) -> str:
    """stdout of `iclca ARGS` in a fresh process (as a user runs it: start-up and model load included)."""
    return subprocess.run([sys.executable, "-m", "iclca_cli.cli", *map(str, args)], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


def best_of(fns: dict, repeats: int, device: torch.device | None = None) -> dict:
    """Minimum seconds of each callable, timed interleaved; on a CUDA device, synchronised around each call."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda *a: None)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def result_arguments(ap) -> None:
    """--json, --out and --markdown of a script whose result is one JSON object."""
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also save the result here")
    ap.add_argument("--markdown", type=Path, default=None, help="print the markdown of a saved result and exit")


def save_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def show_saved(args, markdown) -> bool:
    """Print the markdown of the saved result --markdown names; whether there was one (then the script is done)."""
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
    return bool(args.markdown)


def report(args, result: dict, markdown) -> None:
    """Save the result where --out says, and print it as JSON (--json) or markdown."""
    if args.out:
        save_json(args.out, result)
    print(json.dumps(result) if args.json else markdown(result))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells are printed as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def number(x: float | None, digits: int = 3) -> str:
    """'—' for a missing number, else `digits` significant digits."""
    return "—" if x is None else f"{x:.{digits}g}"


def tiny_recurrent(family: str, dtype=torch.float64, seed: int = 0):
    """A tiny stock state-space / linear-attention / hybrid model of a family in its published layout (Family.tiny,
    the tests' and the self-test's too) with random weights whose state matters."""
    from iclca_cli.families import family_named
    from iclca_cli.selftest import tiny_model

    return tiny_model(family_named(family), dtype, seed)
