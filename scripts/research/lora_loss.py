"""Where lora's loss falls short (a probe): one development prompt, one lora patch trained with the given spec, then
the KL(prompted || lora) on the task's queries (which training never sees) on the whole vocabulary and on the
prompted model's top 20 / 100 / 1000 tokens (the rest of the vocabulary as one more outcome, as distill.top_k_kl
takes it), the prompted model's mass outside its top 20 at the answers, and the mean KL at each training input's
first position against the rest. None of it is part of iclca.

    python scripts/research/lora_loss.py --task labels --spec lora:top_k=20:loss_from=0   # the old loss
    python scripts/research/lora_loss.py --task labels --spec lora                        # the defaults
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model, few_shot_tasks
from common import convert_by  # noqa: E402

import iclca_cli.distill as engine  # noqa: E402
from iclca_cli.loading import load_model  # noqa: E402


def main() -> None:
    from few_shot_tasks import few_shot
    from real_model import DEFAULT_FOLDER, answer_logits, prompted_answers, scored, smollm2_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="labels")
    ap.add_argument("--spec", default="lora")
    args = ap.parse_args()
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    prompt, queries, wants = prompted_answers(model, tokenizer, *few_shot(args.task, random.Random(f"dev-{args.task}")))
    trained = engine.distill
    losses = []

    def probed(student, names, targets_of, training, *a, **kw):
        a = list(a)
        a[1] = lambda step, steps, loss: losses.append(loss)  # progress
        out = trained(student, names, targets_of, training, *a, **kw)
        with torch.no_grad():  # the KL at each training input's first position, and at the others
            first, rest = [], []
            for ids, (logp, top) in targets_of:
                logits = student(input_ids=torch.tensor([ids])).logits[0]
                first.append(float(engine.top_k_kl(logp[:1], top[:1], logits[:1])))
                rest.append(float(engine.top_k_kl(logp[1:], top[1:], logits[1:len(logp)])))
            got = scored(student, queries, wants)
            print(f"{args.task} (P = {len(prompt)}), {args.spec}: query KL {sum(s[1] for s in got) / len(got):.4g}, "
                  f"answers {sum(s[0] for s in got)} (prompted {sum(s[0] for s in scored(None, queries, wants))}) "
                  f"of {len(queries)}")
            for k in (20, 100, 1000):
                kl = 0.0
                for (q, t), want in zip(queries, wants):
                    top = torch.log_softmax(want, -1).topk(k, -1)
                    kl += float(engine.top_k_kl(top.values, top.indices, answer_logits(student, q + t, len(t))))
                print(f"  query KL on the prompted model's top {k} (+ the rest): {kl / len(queries):.4g}")
            outside = [1 - float(torch.softmax(want, -1).topk(20, -1).values.sum(-1).mean()) for want in wants]
            print(f"  the prompted model's mass outside its top 20 at the answers: {min(outside):.3f} to "
                  f"{max(outside):.3f}")
            print(f"  training inputs' KL (on the top {training.top_k}): first position {sum(first) / len(first):.4g}, "
                  f"the others {sum(rest) / len(rest):.4g}")
        return out

    engine.distill = probed
    start = time.monotonic()
    try:
        convert_by(model, prompt, args.spec, tokenizer=tokenizer)
    finally:
        engine.distill = trained
    means = [round(sum(losses[i:i + 50]) / 50, 4) for i in range(0, len(losses), 50)]
    print(f"  training loss, mean of each 50 steps: {means}; {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
