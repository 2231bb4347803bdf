"""The README's persona system prompt baked into SmolLM2-135M-Instruct's weights (`lora --chat`), served as a chat
server serves a stock checkpoint: each question rendered by the stock chat template, which adds its own default
system turn. Beside it, the prompted model (the persona system turn, then the question) and the plain model served
the same way. Which persona facts each one states in its greedy answer, and KL(prompted || x) on the prompted
model's answer tokens (teacher-forced).

    python scripts/real_model.py show --save /dev/null   # once: makes the SmolLM2 folder (see real_model.py)
    python scripts/chat_lora.py [--steps N] [--lr LR] [--json] [--out FILE]
    python scripts/chat_lora.py --markdown scripts/results/chat_lora.json

The questions are never training inputs: lora trains on user turns the prompted model writes and answers itself
(`--train-on auto` with `--chat`). Saves scripts/results/chat_lora.json by default.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import ROOT, markdown_table, number, report, result_arguments, show_saved
from real_model import DEFAULT_FOLDER, answer_logits, smollm2_folder

from iclca_cli import chat
from iclca_cli.convert import convert_prompt, sha256_text
from iclca_cli.evaluate import kl_divergence
from iclca_cli.generation import Sampling, continuation
from iclca_cli.loading import load_model
from iclca_cli.methods import build
from iclca_cli.patch import patched_copy

SYSTEM = ROOT / "configs/examples/persona-system.txt"
# held-out questions, and the persona fact a right answer states (the first three are configs/examples/persona-queries.txt)
QUESTIONS = [("When was the lighthouse built?", "1847"), ("Who built it?", "Tomas Orr"),
             ("What is your name?", "Maren"), ("Who are you?", "Maren"),
             ("What is the name of your lighthouse?", "Brightwater"), ("On which island do you live?", "Skel"),
             ("What is your job?", "keeper"), ("Who built the lighthouse, and when?", "1847")]
ANSWER_TOKENS = 24


def run(steps: int | None, lr: float | None, log=print) -> dict:
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    messages = chat.read_messages(SYSTEM)
    text, prompt = chat.prompt_ids(tokenizer, messages)
    params = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
    method = build("lora", **params)
    t0 = time.perf_counter()
    patch = convert_prompt(model, prompt, sha256_text(text), method, tokenizer=tokenizer, messages=messages)
    seconds = time.perf_counter() - t0
    log(f"lora --chat: {seconds:.0f} s ({len(prompt)} prompt tokens)")
    baked = patched_copy(model, patch)
    served = chat.served_head(tokenizer, ["system"])  # the stock template's own system turn
    greedy = Sampling(ANSWER_TOKENS)
    rows = []
    for question, fact in QUESTIONS:
        turn = chat.query_ids(tokenizer, messages, question, prompt)
        said = continuation(model, prompt + turn, greedy)
        want = answer_logits(model, prompt + turn + said, len(said))  # (len(said), V)
        row = {"question": question, "fact": fact}
        for who, runner, head in (("prompted", model, prompt), ("lora", baked, served), ("plain", model, served)):
            tokens = said if who == "prompted" else continuation(runner, head + turn, greedy)
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            row[who] = {"answer": answer, "fact": fact.lower() in answer.lower(),
                        "kl": 0.0 if who == "prompted" else
                        float(kl_divergence(want, answer_logits(runner, head + turn + said, len(said))).mean())}
        rows.append(row)
        log(f"{question} prompted: {row['prompted']['answer']!r} lora: {row['lora']['answer']!r}")
    return {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "method": patch.method.metadata(),
            "prompt_tokens": len(prompt), "convert_seconds": seconds, "rows": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    stated = {who: sum(r[who]["fact"] for r in rows) for who in ("prompted", "lora", "plain")}
    kept = sum(r["lora"]["fact"] and r["prompted"]["fact"] for r in rows)
    kl = {who: sum(r[who]["kl"] for r in rows) / len(rows) for who in ("lora", "plain")}
    head = (f"{result['model']}, {result['dtype']}, the persona system prompt ({result['prompt_tokens']} tokens) "
            f"baked by lora --chat ({', '.join(f'{k}={v}' for k, v in result['method'].items())}; "
            f"{result['convert_seconds']:.0f} s); {len(rows)} held-out questions, greedy, {ANSWER_TOKENS} tokens\n\n")
    table = markdown_table(
        ["question (fact)", "prompted", "lora (stock template)", "plain (stock template)", "KL lora", "KL plain"],
        [[f"{r['question']} ({r['fact']})", *(f"{'✓' if r[w]['fact'] else '✗'} {r[w]['answer'].strip()}"[:90]
                                              for w in ("prompted", "lora", "plain")),
          number(r["lora"]["kl"]), number(r["plain"]["kl"])] for r in rows])
    summary = (f"\n\nFacts stated: prompted {stated['prompted']}, lora {stated['lora']} ({kept} of the prompted "
               f"model's), plain {stated['plain']}, of {len(rows)}. Mean KL(prompted ‖ x) on the prompted answers: "
               f"lora {number(kl['lora'])}, plain {number(kl['plain'])}.")
    return head + table + summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="lora's --steps (default: its own)")
    ap.add_argument("--lr", type=float, default=None, help="lora's --lr (default: its own)")
    result_arguments(ap)
    args = ap.parse_args()
    if show_saved(args, markdown):
        return
    if args.out is None:
        args.out = ROOT / "scripts/results/chat_lora.json"
    report(args, run(args.steps, args.lr, log=lambda s: print(s, file=sys.stderr, flush=True)), markdown)


if __name__ == "__main__":
    main()
