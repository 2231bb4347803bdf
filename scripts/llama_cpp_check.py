"""A prompt baked into the weights, served outside transformers: a `lora` patch of SmolLM2-135M-Instruct (few-shot
examples), merged into a stock checkpoint, converted to GGUF by llama.cpp's own converter and run by llama.cpp
(llama-cpp-python). Its greedy tokens on the prompt's queries against transformers' on the same merged folder, and
the plain model's beside them (what the baked prompt changed).

    pip install llama-cpp-python sentencepiece   # builds llama.cpp from source (cmake, a C++ compiler); the converter reads the tokenizer with sentencepiece
    python scripts/llama_cpp_check.py [--outtype f32|f16] [--json]

llama.cpp's converter, convert_hf_to_gguf.py, ships in llama-cpp-python's source distribution (vendor/llama.cpp),
not in its wheel: the script uses the one in --llama-cpp-source, or unpacks the sdist that `pip download` fetches
from the package registry (once, into ~/.cache/iclca). Saves scripts/results/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from common import ROOT, markdown_table, save_json

CACHE = Path(os.environ.get("ICLCA_CACHE_DIR", Path.home() / ".cache/iclca"))
RESULT = ROOT / "scripts/results/llama_cpp.json"


def llama_cpp_source(given: Path | None) -> Path:
    """The llama.cpp tree (with convert_hf_to_gguf.py and gguf-py) of the installed llama-cpp-python's version."""
    if given is not None:
        return given
    from importlib.metadata import version

    release = version("llama_cpp_python")
    tree = CACHE / f"llama_cpp_python-{release}" / "vendor/llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={release}", "--no-deps",
                            "--no-binary", ":all:", "-d", tmp], check=True, capture_output=True)
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
                sdist.extractall(CACHE, filter="data")
    return tree


def to_gguf(folder: Path, source: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's converter on a Hugging Face folder (its own gguf-py first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    proc = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                           "--outfile", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return out


def llama_cpp_greedy(gguf: Path, queries: list[list[int]], new_tokens: int) -> list[list[int]]:
    """llama.cpp's greedy continuation of each query (token ids in, token ids out)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count(), seed=0, verbose=False)
    out = []
    for ids in queries:
        llm.reset()
        got = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(got) == new_tokens:
                break
            got.append(token)
        out.append(got)
    return out


@torch.no_grad()
def transformers_greedy(model, queries: list[list[int]], new_tokens: int, eos: int | None) -> list[list[int]]:
    out = []
    for ids in queries:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids):].tolist()
        out.append(gen[:gen.index(eos)] if eos in gen else gen)
    return out


def check(folder: Path, base, queries: list[list[int]], source: Path, outtype: str, new_tokens: int = 6) -> dict:
    """The merged folder in llama.cpp (GGUF of `outtype`) against transformers, token for token; the plain model's
    tokens beside them."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # stock: no remote code
    eos = merged.config.eos_token_id if isinstance(merged.config.eos_token_id, int) else None
    with tempfile.TemporaryDirectory() as tmp:
        gguf = to_gguf(folder, source, outtype, Path(tmp) / f"merged-{outtype}.gguf")
        served = llama_cpp_greedy(gguf, queries, new_tokens)
    reference = transformers_greedy(merged, queries, new_tokens, eos)
    plain = transformers_greedy(base, queries, new_tokens, eos)
    return {"outtype": outtype, "queries": len(queries), "identical": sum(a == b for a, b in zip(served, reference)),
            "differ_from_plain": sum(a != b for a, b in zip(reference, plain)),
            "rows": [{"llama_cpp": a, "transformers": b, "plain": c} for a, b, c in zip(served, reference, plain)]}


def main() -> None:
    from few_shot_tasks import few_shot
    from real_model import DEFAULT_FOLDER, smollm2_folder

    from iclca_cli.convert import convert_prompt, sha256_text
    from iclca_cli.inputs import encode_continuation, encode_prompt
    from iclca_cli.loading import load_fingerprinted
    from iclca_cli.merge import merge_patch
    from iclca_cli.methods import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outtype", nargs="+", default=["f32", "f16"], choices=["f32", "f16"])
    ap.add_argument("--llama-cpp-source", type=Path, default=None, help="a llama.cpp tree (vendor/llama.cpp of the sdist)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--show", action="store_true", help="print the saved result again (runs nothing)")
    args = ap.parse_args()
    if args.show:
        print(tables(json.loads(RESULT.read_text())))
        return
    source = llama_cpp_source(args.llama_cpp_source)
    model, tokenizer, fingerprint = load_fingerprinted(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    text, facts = few_shot("words", random.Random("llama-cpp"))
    prompt = encode_prompt(tokenizer, text)
    print(f"training a lora patch on a {len(prompt)}-token prompt ...", file=sys.stderr)
    patch = convert_prompt(model, prompt, sha256_text(text), build("lora"), fingerprint=fingerprint, tokenizer=tokenizer)
    queries = [encode_continuation(tokenizer, q) for q, _ in facts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = merge_patch(model, tokenizer, patch, Path(tmp) / "merged")
        result = {"model": "SmolLM2-135M-Instruct + lora (words prompt, defaults)", "prompt_tokens": len(prompt),
                  "checks": [check(folder, model, queries, source, t) for t in args.outtype]}
    for c in result["checks"]:
        for (query, target), row in zip(facts, c["rows"]):
            row["query"], row["prompt_says"] = query, target
            row.update({f"{k}_text": tokenizer.decode(row[k]) for k in ("llama_cpp", "transformers", "plain")})
    save_json(RESULT, result)
    print(json.dumps(result) if args.json else tables(result))


def tables(result: dict) -> str:
    """The saved result as markdown: per GGUF type, how many queries llama.cpp answers token for token as
    transformers does; then the first type's answers (a newline shown as ⏎)."""
    shown = lambda text: text.replace("\n", "⏎")  # noqa: E731
    return "\n\n".join([
        f"{result['model']}, a {result['prompt_tokens']}-token prompt; greedy, 6 new tokens per query",
        markdown_table(["GGUF", "queries", "llama.cpp = transformers (tokens)", "differ from the plain model"],
                       [[c["outtype"], c["queries"], c["identical"], c["differ_from_plain"]] for c in result["checks"]]),
        markdown_table(["query", "the prompt says", "llama.cpp", "transformers", "plain model"],
                       [[r["query"], r["prompt_says"], shown(r["llama_cpp_text"]), shown(r["transformers_text"]),
                         shown(r["plain_text"])]
                        for r in result["checks"][0]["rows"]])])

if __name__ == "__main__":
    main()
