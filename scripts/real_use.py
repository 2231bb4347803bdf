"""Real use at scale (issue 15), measured: reduced precision, many prompts per call, chat models, fast eval.

    python scripts/real_use.py [--quick] [--json] [--out scripts/results/real_use.json] [--markdown FILE]

1. bfloat16: convert -> eval on a tiny random Llama and on SmolLM2-135M-Instruct, in bfloat16, through the command
   line: top-1 agreement with prompted, and max |Δlogit| against the yardstick of the same run (the prompted model
   in bfloat16 against itself in float32).
2. Many prompts, one load: 20 prompt files converted by one `iclca convert --out-dir` against 20 separate
   `iclca convert` processes on demo-linear (wall clock of each, in the same run), and whether the bytes are equal.
3. --chat on SmolLM2-Instruct in float64: the patch of a system message, on each user turn, against the model on the
   whole rendered conversation in one pass (tokenized by apply_chat_template, independently of iclca).
4. Fast eval on SmolLM2: one `evaluate` over a ~1k-token prompt and 20 queries reading the prompt once, against the
   model work eval did before (two reads of prompt + query per query) and against the same report made by
   re-reading the prompt once per query (the path families without a usable cache take), in the same run; the
   reports' numbers must agree within float noise.
--quick: smaller sizes (a 200-token prompt, 5 prompt files); still needs SmolLM2 (see scripts/real_model.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, cli, markdown_table, number, report, result_arguments, show_saved
from real_model import DEFAULT_FOLDER, NAMES, smollm2_folder

from iclca_cli import chat
from iclca_cli.convert import convert_prompt
from iclca_cli.evaluate import evaluate, greedy_continuation, next_token_logits
from iclca_cli.inputs import Query, encode_continuation, encode_prompt, read_queries
from iclca_cli.loading import load_model
from iclca_cli.patch import load_patch, patched_copy
from iclca_demo.tasks import RecallTask

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Delhi", "Seoul", "Accra", "Dublin", "Perth",
          "Hanoi", "Riga", "Bern", "Doha", "Kyiv", "Sofia", "Madrid", "Vienna"]
JOBS = ["baker", "pilot", "doctor", "farmer", "lawyer", "painter", "singer", "tailor", "nurse", "miner"]


def facts_prompt(n_facts: int, n_queries: int, seed: int) -> tuple[str, list[Query]]:
    """n_facts lines "Name lives in City and works as a job." (names repeat with suffixes past the list), queries
    "Name lives in" -> " City" about the first n_queries people."""
    rng = random.Random(seed)
    people = [NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {chr(65 + i // len(NAMES))}.") for i in range(n_facts)]
    facts = [(p, rng.choice(CITIES), rng.choice(JOBS)) for p in people]
    text = "".join(f"{p} lives in {c} and works as a {j}.\n" for p, c, j in facts)
    return text, [Query(f"{p} lives in", f" {c}") for p, c, _ in facts[:n_queries]]


def tiny_llama(folder: Path) -> Path:
    """A tiny random Llama (2 layers, width 64) with the demo models' word tokenizer, saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from iclca_demo.word_tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(RecallTask.from_json(ROOT / "configs/tasks/recall.json").words)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bfloat16_rows(tmp: Path, smollm2: Path, quick: bool) -> list[dict]:
    rows = []
    facts, queries = facts_prompt(12 if quick else 30, 12 if quick else 30, seed=1)
    lines = (ROOT / "configs/examples/recall-prompt.txt").read_text().splitlines()
    recall = [{"input": "".join(f"{line}\n" for line in lines[i - span:i]) + lines[i].split(":")[0] + ":",
               "target": " " + lines[i].split(": ")[1]}
              for span in (1, 2, 3) for i in range(span, len(lines))]  # lines of the prompt, then a key: ~100 positions
    (tmp / "recall.jsonl").write_text("".join(json.dumps(q) + "\n" for q in recall))
    cases = {"tiny random Llama": (tiny_llama(tmp / "llama"), ROOT / "configs/examples/recall-prompt.txt",
                                   tmp / "recall.jsonl"),
             "SmolLM2-135M-Instruct": (smollm2, tmp / "facts.txt", tmp / "facts.jsonl")}
    (tmp / "facts.txt").write_text(facts)
    (tmp / "facts.jsonl").write_text("".join(json.dumps({"input": q.input, "target": q.target}) + "\n" for q in queries))
    for name, (model, prompt, queries_file) in cases.items():
        cli("convert", prompt, "-m", model, "-o", tmp / "bf16.st", "--dtype", "bfloat16")
        report = json.loads(cli("eval", "-m", model, "-p", tmp / "bf16.st", "--prompt", prompt, "--queries",
                                queries_file, "--dtype", "bfloat16", "--json"))
        p = report["precision"]
        # eval's prompted model continues from the prompt's cache, as a server would; also against one pass over
        # prompt + query, which rounds differently in bfloat16
        base, tokenizer = load_model(str(model), "bfloat16")
        patch = load_patch(tmp / "bf16.st")
        one_pass = evaluate(base, patched_copy(base, patch), tokenizer, Path(prompt).read_text(),
                            read_queries(queries_file), patch.method, patch.nbytes, 2, reuse_cache=False,
                            float32_base=load_model(str(model), "float32")[0])
        q = one_pass["precision"]
        rows.append({"model": name, "prompt_tokens": report["prompt_tokens"], "queries": report["queries"],
                     "top1_agreement": report["top1_agreement"], "max_abs_logit_diff": report["max_abs_logit_diff"],
                     "top1_agreement_float32": p["prompted_vs_float32_top1_agreement"],
                     "yardstick": p["prompted_vs_float32_max_abs_logit_diff"],
                     "ratio": p["max_abs_logit_diff_over_yardstick"], "accuracy": report.get("accuracy"),
                     "one_pass_top1_agreement": one_pass["top1_agreement"],
                     "one_pass_max_abs_logit_diff": one_pass["max_abs_logit_diff"],
                     "one_pass_yardstick": q["prompted_vs_float32_max_abs_logit_diff"],
                     "one_pass_ratio": q["max_abs_logit_diff_over_yardstick"],
                     "holds": min(report["top1_agreement"], one_pass["top1_agreement"]) >= 0.99
                     and max(p["max_abs_logit_diff_over_yardstick"], q["max_abs_logit_diff_over_yardstick"]) <= 2})
    return rows


def many_prompts_row(tmp: Path, quick: bool) -> dict:
    n = 5 if quick else 20
    folder = tmp / "prompts"
    folder.mkdir()
    rng = random.Random(3)
    words = RecallTask.from_json(ROOT / "configs/tasks/recall.json").words
    for i in range(n):
        (folder / f"p{i:02d}.txt").write_text("".join(f"{w}: {rng.randint(0, 9)}\n" for w in rng.sample(words, 8)))
    files = sorted(folder.iterdir())
    t0 = time.perf_counter()
    for f in files:
        cli("convert", f, "-m", "demo-linear", "-o", tmp / f"{f.stem}.safetensors")
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    cli("convert", *files, "-m", "demo-linear", "--out-dir", tmp / "many")
    one_call = time.perf_counter() - t0
    identical = all((tmp / "many" / f"{f.stem}.safetensors").read_bytes() == (tmp / f"{f.stem}.safetensors").read_bytes()
                    for f in files)
    return {"prompts": n, "separate_s": separate, "one_call_s": one_call, "speed_up": separate / one_call,
            "identical_bytes": identical, "holds": identical and separate / one_call >= 5}


def chat_rows(smollm2: Path) -> list[dict]:
    model, tokenizer = load_model(str(smollm2), "float64")
    messages = [{"role": "system", "content": "You are a terse assistant for a bakery. Prices: bread 3 euros, "
                                              "croissant 2 euros, cake 15 euros. Answer with the price only."}]
    _, prompt_ids = chat.prompt_ids(tokenizer, messages)
    patched = patched_copy(model, convert_prompt(model, prompt_ids, "-"))
    rows = []
    with torch.inference_mode():
        for question in ("How much is a croissant?", "And the cake?", "What do you sell?"):
            whole = tokenizer.apply_chat_template([*messages, {"role": "user", "content": question}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            q_ids = chat.query_ids(tokenizer, messages, question)
            assert whole[:len(prompt_ids)] == prompt_ids and whole[len(prompt_ids):] == q_ids
            prompted = model(input_ids=torch.tensor([whole])).logits[0, len(prompt_ids):]
            plain = model(input_ids=torch.tensor([q_ids])).logits[0]
            diff = float((patched(input_ids=torch.tensor([q_ids])).logits[0] - prompted).abs().max())
            rows.append({"query": question, "prompt_tokens": len(prompt_ids), "query_tokens": len(q_ids),
                         "max_abs_logit_diff": diff, "without_prompt": float((plain - prompted).abs().max()),
                         "holds": diff <= 1e-10})
    return rows


def previous_eval_seconds(model, patched, tokenizer, facts: str, queries: list[Query]) -> float:
    """Seconds of the model work `iclca eval` did per query before this change (commit cd12e00, evaluate.py): a
    pass over prompt + query for the logits, and greedy decoding of the target from prompt + query again; the
    patched and base models on the query likewise (no comparisons: they cost little)."""
    prompt = encode_prompt(tokenizer, facts)
    t0 = time.perf_counter()
    for q in queries:
        q_ids, k = encode_continuation(tokenizer, q.input), len(encode_continuation(tokenizer, q.target))
        next_token_logits(model, prompt + q_ids)
        next_token_logits(patched, q_ids)
        next_token_logits(model, q_ids)
        greedy_continuation(model, q_ids, k)
        greedy_continuation(model, prompt + q_ids, k)
        greedy_continuation(patched, q_ids, k)
    return time.perf_counter() - t0


def fast_eval_row(smollm2: Path, quick: bool) -> dict:
    model, tokenizer = load_model(str(smollm2))
    facts, queries = facts_prompt(25 if quick else 64, 5 if quick else 20, seed=2)
    patch = convert_prompt(model, tokenizer(facts).input_ids, "-")
    patched = patched_copy(model, patch)
    runs = {}
    for name, reuse in (("reread", False), ("fast", True)):
        t0 = time.perf_counter()
        report = evaluate(model, patched, tokenizer, facts, queries, patch.method, patch.nbytes, 4, reuse_cache=reuse)
        runs[name] = (time.perf_counter() - t0, report)
    (slow_s, slow), (fast_s, fast) = runs["reread"], runs["fast"]
    previous_s = previous_eval_seconds(model, patched, tokenizer, facts, queries)
    worst = max(abs(fast[k] - slow[k]) for k in ("max_abs_logit_diff", "kl_prompted_patched", "kl_prompted_base"))
    same = fast["accuracy"] == slow["accuracy"] and fast["top1_agreement"] == slow["top1_agreement"] and worst <= 1e-3
    return {"prompt_tokens": fast["prompt_tokens"], "queries": fast["queries"], "previous_s": previous_s,
            "reread_s": slow_s, "fast_s": fast_s, "speed_up": previous_s / fast_s, "accuracy": fast["accuracy"],
            "largest_report_difference": worst, "same_report": same, "holds": same and previous_s / fast_s >= 5}


def verdict(top1: float, ratio: float) -> str:
    """The issue's bar for reduced precision: top-1 agreement >= 0.99 and max |Δlogit| <= 2x the yardstick."""
    return "yes" if top1 >= 0.99 and ratio <= 2 else "**no**"


def markdown(r: dict) -> str:
    parts = [f"Measured with `python scripts/real_use.py{' --quick' if r['quick'] else ''}` on {r['machine']}.",
             "bfloat16 (convert and eval through the command line, whose prompted model continues from the prompt's "
             "cache; and against one pass over prompt + query; yardstick: prompted in bfloat16 against float32, "
             "same run):",
             markdown_table(["model", "P", "queries", "prompted", "top-1 agreement (prompted bf16 vs float32)",
                             "max abs Δlogit", "yardstick", "ratio", "holds"],
                            [row for b in r["bfloat16"] for row in (
                                [b["model"], b["prompt_tokens"], b["queries"], "from its cache",
                                 f"{b['top1_agreement']:.3f} ({b['top1_agreement_float32']:.3f})",
                                 number(b["max_abs_logit_diff"]), number(b["yardstick"]), f"{b['ratio']:.2f}",
                                 verdict(b["top1_agreement"], b["ratio"])],
                                ["", "", "", "one pass", f"{b['one_pass_top1_agreement']:.3f}",
                                 number(b["one_pass_max_abs_logit_diff"]), number(b["one_pass_yardstick"]),
                                 f"{b['one_pass_ratio']:.2f}", verdict(b["one_pass_top1_agreement"], b["one_pass_ratio"])])]),
             "Many prompts, one load (demo-linear):",
             markdown_table(["prompts", f"{r['many']['prompts']} separate calls, s", "one call, s", "speed-up",
                             "identical bytes"],
                            [[r["many"]["prompts"], f"{r['many']['separate_s']:.1f}", f"{r['many']['one_call_s']:.1f}",
                              f"{r['many']['speed_up']:.1f}×", "yes" if r["many"]["identical_bytes"] else "**no**"]]),
             "`--chat` on SmolLM2-135M-Instruct, float64 (patched on the user turn against one pass over the whole "
             "rendered conversation):",
             markdown_table(["user turn", "prompt tokens", "query tokens", "max abs Δlogit", "without the prompt"],
                            [[c["query"], c["prompt_tokens"], c["query_tokens"], number(c["max_abs_logit_diff"]),
                              number(c["without_prompt"])] for c in r["chat"]]),
             "Fast eval on SmolLM2 (float32, prefix patch):",
             markdown_table(["P", "queries", "before (two reads per query), s", "re-reading once per query, s",
                             "reading it once, s", "speed-up over before", "largest report difference",
                             "accuracy (base / prompted / patched)"],
                            [[r["eval"]["prompt_tokens"], r["eval"]["queries"], f"{r['eval']['previous_s']:.1f}",
                              f"{r['eval']['reread_s']:.1f}", f"{r['eval']['fast_s']:.1f}", f"{r['eval']['speed_up']:.1f}×",
                              number(r["eval"]["largest_report_difference"]),
                              " / ".join(f"{v:.2f}" for v in r["eval"]["accuracy"].values())]])]
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    result_arguments(ap)
    ap.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="the SmolLM2 checkpoint folder")
    args = ap.parse_args()
    if show_saved(args, markdown):
        return
    smollm2 = smollm2_folder(args.folder)
    torch.set_num_threads(2)
    import platform

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("bfloat16 ...", file=sys.stderr)
        result["bfloat16"] = bfloat16_rows(tmp, smollm2, args.quick)
        print("many prompts ...", file=sys.stderr)
        result["many"] = many_prompts_row(tmp, args.quick)
    print("chat ...", file=sys.stderr)
    result["chat"] = chat_rows(smollm2)
    print("fast eval ...", file=sys.stderr)
    result["eval"] = fast_eval_row(smollm2, args.quick)
    result["holds"] = all(x["holds"] for x in [*result["bfloat16"], result["many"], *result["chat"], result["eval"]])
    report(args, result, markdown)


if __name__ == "__main__":
    main()
