"""Does a KL measured on inputs held back from training tell when `compressed --refine` should stop? A probe on
development prompts: each prompt's P/4 summary is refined with the defaults and `--held-back N` (lines of the prompt,
never trained on), and at every check (before training, then after each quarter of the steps) it prints the
held-back KL beside the KL on the task's queries (which training never sees; the probe reads them only to show
whether the held-back KL follows them). None of it is part of iclca.

    python scripts/research/refine_checks.py [--tasks words labels digits format] [--prompts 2] [--held-back 8]

Prints, per task: the query KL at each check, the step the held-back KL picks, and the query KL there against the
fitted summary's (step 0) and the last step's.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model
from common import convert_by, markdown_table, number

import iclca_cli.distill as distill_module
from iclca_cli.loading import load_model


def main() -> None:
    from few_shot_tasks import few_shot
    from real_model import DEFAULT_FOLDER, prompted_answers, scored, smollm2_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["words", "labels", "digits", "format"])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--held-back", type=int, default=8)
    ap.add_argument("--fraction", type=int, default=4)
    args = ap.parse_args()
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    engine, rows = distill_module.distill, []
    for task in args.tasks:
        rng = random.Random(f"dev-{task}")
        for n in range(args.prompts):
            prompt, queries, wants = prompted_answers(model, tokenizer, *few_shot(task, rng))
            seen = []  # (step, held-back KL, query KL)

            def probed(student, *a, **kw):
                def checked(step, loss):
                    with torch.no_grad():
                        kl = sum(s[1] for s in scored(student, queries, wants)) / len(queries)
                    seen.append((step, loss, kl))
                return engine(student, *a, **kw, checked=checked)

            distill_module.distill = probed
            try:
                convert_by(model, prompt, f"compressed-P/{args.fraction}:refine=True:held_back={args.held_back}",
                           tokenizer=tokenizer)
            finally:
                distill_module.distill = engine
            picked = min(seen, key=lambda s: s[1])
            rows.append([task, len(prompt), " ".join(f"{s[0]}: {number(s[1])} / {number(s[2])}" for s in seen),
                         picked[0], number(seen[0][2]), number(seen[-1][2]), number(picked[2])])
            print(rows[-1], file=sys.stderr)
    print(markdown_table(["task", "P", "step: held-back KL / query KL", "step kept", "query KL fitted",
                          "query KL last", "query KL kept"], rows))


if __name__ == "__main__":
    main()
