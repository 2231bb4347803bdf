"""How far does `lora` get, and when? A probe on development prompts: each variant trains a lora patch with
`--held-back 4` (so the engine checks before training and after each quarter of the steps), and at every check it
prints the KL on the task's queries and the answers right (which training never sees; the probe reads them only
to show how training goes). Variants are method specs (`lora:steps=400:train_count=128:schedule=cosine`), optionally
followed by `@` and settings that are not flags: the engine's (`@max_len=32`), or this probe's `@init=fit[:ridge=0.01]`
(lora_fit.py's least-squares start instead of B = 0). None of it is part of iclca.

    python scripts/research/lora_checks.py [--tasks words labels] [--prompts 1] [--variants lora lora:steps=200@init=fit]

Prints, per task and variant: the query KL / answers right at each check, and the prompted model's answers right.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lora_fit
from common import convert_by, markdown_table, number

import iclca_cli.distill as distill_module
import iclca_cli.lora_layers as lora_layers
from iclca_cli.loading import load_model
from lora_fit import fitted_update

plain_start = lora_layers.convert


PROBE_SETTINGS = {"init": str, "ridge": float}  # not the engine's: `init=fit` starts from lora_fit.fitted_update


def engine_settings(text: str) -> dict:
    """'inputs=128:max_len=32' -> {'inputs': 128, 'max_len': 32} (Training fields; types as the defaults')."""
    from iclca_cli.training import Training

    out = {}
    for item in filter(None, text.split(":")):
        key, value = item.split("=")
        out[key] = PROBE_SETTINGS[key](value) if key in PROBE_SETTINGS else type(getattr(Training, key))(value)
    return out


def main() -> None:
    from few_shot_tasks import few_shot
    from real_model import DEFAULT_FOLDER, prompted_answers, scored, smollm2_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["words", "labels"])
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["lora"])
    args = ap.parse_args()
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    engine, drawn, rows = distill_module.distill, distill_module.training_inputs, []
    for task in args.tasks:
        rng = random.Random(f"dev-{task}")
        for n in range(args.prompts):
            prompt, queries, wants = prompted_answers(model, tokenizer, *few_shot(task, rng))
            prompted = sum(s[0] for s in scored(None, queries, wants))
            for variant in args.variants:
                spec, _, extra = variant.partition("@")
                settings = engine_settings(extra)
                probe = {key: settings.pop(key) for key in PROBE_SETTINGS if key in settings}
                seen = []  # (step, query KL, answers right)

                def probed(student, names, targets_of, training, *a, **kw):
                    def checked(step, loss):
                        with torch.no_grad():
                            got = scored(student, queries, wants)
                        seen.append((step, sum(s[1] for s in got) / len(got), sum(s[0] for s in got)))
                    return engine(student, names, targets_of, dataclasses.replace(training, **settings), *a, **kw,
                                  checked=checked)

                def inputs(teacher, prompt_ids, training, *a, **kw):
                    return drawn(teacher, prompt_ids, dataclasses.replace(training, **settings), *a, **kw)

                distill_module.distill, distill_module.training_inputs = probed, inputs
                if probe.get("init") == "fit":
                    lora_layers.convert = functools.partial(fitted_update, ridge=probe.get("ridge", 1e-2))
                start = time.monotonic()
                try:
                    convert_by(model, prompt, f"{spec}:held_back=4", tokenizer=tokenizer)
                finally:
                    distill_module.distill, distill_module.training_inputs = engine, drawn
                    lora_layers.convert = plain_start
                rows.append([task, len(prompt), variant, " · ".join(f"{s[0]}: {number(s[1])} ({s[2]})" for s in seen),
                             f"{prompted} of {len(queries)}", f"{time.monotonic() - start:.0f}"])
                print(rows[-1], file=sys.stderr, flush=True)
    print(markdown_table(["task", "P", "variant", "step: query KL (answers right)", "prompted right", "s"], rows))


if __name__ == "__main__":
    main()
