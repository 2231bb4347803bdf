"""Which weight should the split give each head's error? A probe on development prompts, comparing the budgets a
split gives when each head's attention-output error is weighed by (compressed --weigh): nothing (none); its layer's
effect on the residual stream *entering* the layer (residual: output-projection gain x mean over tokens of
1 / ||h_in||^2); or on the stream *leaving* it (leaving: the same gain x mean 1 / ||h_out||^2, the decoder layer's
output). The weights are Captured.weights, as convert measures them.

    python scripts/research/split_weights.py demo-gpt2 [--prompts 40]
    python scripts/research/split_weights.py smollm2 --tasks digits words labels format [--fraction 4]

demo-gpt2: recall prompts seeded "dev-weights" (not reproduce.py's), budget P/3, KL at each query's answer
position. SmolLM2: real_model.py's development prompts (seeded dev-<task>), budget P/fraction, scored as there.
Prints the mean KL(prompted || patched) per weighting.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model, reproduce
from common import markdown_table, number

from iclca_cli import summaries
from iclca_cli.evaluate import kl_divergence
from iclca_cli.loading import load_model


WEIGHS = ("none", "residual", "leaving")  # compressed --weigh: nothing, the stream entering, the stream leaving


def kl_of(model, heads, prompt, budget, weigh, score) -> float:
    """Mean KL of `score` on the model patched with the split that weighs each head's error by `weigh`."""
    per_head, fits = summaries.head_budgets(heads, budget, weigh=weigh)
    return score(summaries.patched_with(model, heads, [fits[b][h] for h, b in enumerate(per_head)], len(prompt)))


@torch.no_grad()
def demo_gpt2(n: int) -> dict[str, float]:
    import reproduce as rp
    from iclca_cli.inputs import encode_continuation, encode_prompt

    model, tokenizer = load_model("demo-gpt2", "float32")
    task = rp.RecallTask.from_json(rp.ROOT / "configs/tasks/recall.json")
    rng, out = random.Random("dev-weights"), {}
    for _ in range(n):
        text, queries = task.sample(rng)
        prompt = encode_prompt(tokenizer, text)
        qs = [encode_continuation(tokenizer, q.input) for q in queries]
        wants = [model(input_ids=torch.tensor([prompt + q])).logits[0, -1:].double() for q in qs]
        heads = summaries.prompt_heads(model, prompt)

        def score(patched):
            return sum(float(kl_divergence(w, patched(input_ids=torch.tensor([q])).logits[0, -1:].double()).mean())
                       for q, w in zip(qs, wants)) / len(qs)

        for weigh in WEIGHS:
            out[weigh] = out.get(weigh, 0.0) + kl_of(model, heads, prompt, len(prompt) // 3, weigh, score) / n
    return out


@torch.no_grad()
def smollm2(tasks: list[str], fraction: int) -> dict[str, float]:
    from few_shot_tasks import few_shot
    from real_model import DEFAULT_FOLDER, prompted_answers, scored, smollm2_folder

    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    out, n = {}, 3 * len(tasks)
    for task in tasks:
        rng = random.Random(f"dev-{task}")
        for _ in range(3):
            prompt, queries, wants = prompted_answers(model, tokenizer, *few_shot(task, rng))
            heads = summaries.prompt_heads(model, prompt)

            def score(patched):
                return sum(s[1] for s in scored(patched, queries, wants)) / len(queries)

            for weigh in WEIGHS:
                out[weigh] = out.get(weigh, 0.0) + kl_of(model, heads, prompt, len(prompt) // fraction, weigh,
                                                         score) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["demo-gpt2", "smollm2"])
    ap.add_argument("--prompts", type=int, default=40, help="demo-gpt2's prompts")
    ap.add_argument("--tasks", nargs="+", default=["digits", "words", "labels", "format"], help="SmolLM2's dev tasks")
    ap.add_argument("--fraction", type=int, default=4, help="SmolLM2's budget: P / fraction")
    args = ap.parse_args()
    result = demo_gpt2(args.prompts) if args.model == "demo-gpt2" else smollm2(args.tasks, args.fraction)
    print(markdown_table(["weighting", "mean KL(prompted‖patched)"], [[k, number(v)] for k, v in result.items()]))


if __name__ == "__main__":
    main()
