"""Candidates for `compressed` on a long list, probed on development tasks (SmolLM2-135M-Instruct, R = 32): the
default, an on-policy fit, a wider split, all reference queries, and a summary trained by gradient. None is part of
iclca; docs/smollm2.md says why.

    python scripts/long_list_probe.py [--task long_numbers] [--prompts 2] [--budget 32] [--steps 100]

- default: `compressed` as shipped (repeat-prefill reference queries, most-attended keys, split by heads);
- on-policy: the same budgets per head, but every layer refitted in a second pass over the repeat, on the repeat's
  queries as the layers below (already refitted) leave them, as attention matching's on-policy fit does;
- grid 8x / 32x: a head may take up to 8 or 32 times the budget in the split (compress.GRID_TOP, default 4);
- all queries: every reference query, not at most 2,048 per head (compress.MAX_QUERIES);
- self-study: the default's keys, values and biases trained by gradient through the model (Adam, `--steps` steps),
  on KL(prompted || patched) over random 16-token spans of the prompt re-read after it (after Cartridges,
  Eyuboglu et al. 2025): each step reads 256 tokens, the look-ups a question makes; ~3.5 s a step on 2 CPU cores.
Scored as in scripts/real_model.py (whole answers, KL at the answer positions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import dataclasses
import random
import time

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model
from common import convert_by, markdown_table, number
from few_shot_tasks import few_shot
from real_model import DEFAULT_FOLDER, prompted_answers, scored, smollm2_folder

from iclca_cli import summaries
from iclca_cli.families import family_of
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.loading import load_model
from iclca_cli.ops import compress
from iclca_cli.patch import patched_copy, shared_copy
from iclca_cli.softmax_layers import attach, attention_modules, capture_prompt_kv


@torch.no_grad()
def on_policy(model, prompt: list[int], budget: int):
    """A patched copy of model whose layers are refitted in order, each on the repeat's queries computed with the
    layers below already summarised."""
    family, P = family_of(model), len(prompt)
    with capture_prompt_kv(model, attention_modules(model, family)) as captured:
        model.base_model(input_ids=torch.tensor([prompt + prompt]), use_cache=False)
    per_head, _ = summaries.head_budgets(summaries.captured_heads(captured, P), budget)
    Hkv = next(iter(captured.values())).keys.shape[0]
    # the second pass reads the repeat after the exact prompt (bias 0); each layer swaps in its summary as it runs
    exact = {f"{n}.{b}": t for n, c in captured.items() for b, t in
             (("prefix_keys", c.keys[:, :P]), ("prefix_values", c.values[:, :P]), ("prefix_bias", c.keys.new_zeros(Hkv, P)))}
    runner = shared_copy(model)
    attach(runner, family, {n: t.contiguous() for n, t in exact.items()}, P)
    tensors = {}
    for i, (name, module) in enumerate(attention_modules(runner, family).items()):
        def refit(key, value, query, scaling, sliding_window, softcap, c=captured[name], module=module, i=i, name=name):
            k, v = c.keys[:, :P], c.values[:, :P]  # (Hkv, P, D)
            q = torch.cat([c.queries[:, :P], query[0]], 1)  # (H, 2P, D): the prompt's own, the repeat's now
            ref = compress.reference(k, v, q.reshape(Hkv, -1, q.shape[-1]), scaling, softcap)
            fitted = []
            for h in range(Hkv):
                r = per_head[i * Hkv + h]
                one = compress.Reference(*(getattr(ref, f.name)[h:h + 1] for f in dataclasses.fields(ref)))
                fitted.append(compress.summarise(k[h:h + 1], v[h:h + 1], one, [r], torch.tensor(scaling), softcap)[r])
            for buffer, t in summaries.layer_tensors(fitted, k.dtype).items():
                module.register_buffer(buffer, t.clone())
                tensors[f"{name}.{buffer}"] = t
            module._iclca_capture = None

        module._iclca_capture = refit
    runner.base_model(input_ids=torch.tensor([prompt]), use_cache=False)
    out = shared_copy(model)
    attach(out, family, tensors, P)
    return out


def self_study(model, patched, prompt: list[int], steps: int, lr: float = 1e-3, span: int = 16, length: int = 256):
    """patched (a copy of model with a `compressed` patch), its summaries trained in place: keys, values and biases."""
    trained = [b for n, b in patched.named_buffers() if n.rsplit(".", 1)[-1] in ("prefix_keys", "prefix_values", "prefix_bias")]
    for t in [*model.parameters(), *patched.parameters()]:
        t.requires_grad_(False)
    for b in trained:
        b.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    rng, P = random.Random("self-study"), len(prompt)
    with torch.enable_grad():
        for _ in range(steps):
            x = [t for _ in range(length // span) for s in [rng.randrange(P - span)] for t in prompt[s:s + span]]
            with torch.no_grad():
                want = model(input_ids=torch.tensor([prompt + x])).logits[0, P:].log_softmax(-1)  # (length, V)
            got = patched(input_ids=torch.tensor([x])).logits[0].log_softmax(-1)
            loss = (want.exp() * (want - got)).sum(-1)[1:].mean()  # KL per position; the first has no span context
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for b in trained:
        b.requires_grad_(False)
    return patched


def with_constant(name: str, value, make):
    def run():
        before = getattr(compress, name)
        setattr(compress, name, value)
        try:
            return make()
        finally:
            setattr(compress, name, before)

    return run


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="long_numbers")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="self-study: training steps")
    args = ap.parse_args()
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    fingerprint = model_fingerprint(model)
    default = lambda: patched_copy(model, convert_by(model, prompt, f"compressed-{args.budget}", fingerprint=fingerprint))  # noqa: E731
    candidates = {"default": default, "on-policy": lambda: on_policy(model, prompt, args.budget),
                  "grid 8x": with_constant("GRID_TOP", 8, default), "grid 32x": with_constant("GRID_TOP", 32, default),
                  "all queries": with_constant("MAX_QUERIES", 1 << 30, default),
                  f"self-study ({args.steps} steps)": lambda: self_study(model, default(), prompt, args.steps)}
    rng = random.Random(f"dev-{args.task}")
    totals = {name: [0, 0.0, 0, 0.0] for name in ["prompted", *candidates]}  # right, KL, queries, seconds to make
    for i in range(args.prompts):
        prompt, queries, wants = prompted_answers(model, tokenizer, *few_shot(args.task, rng))
        for name, make in [("prompted", lambda: None), *candidates.items()]:
            start = time.perf_counter()
            patched = make()
            totals[name][3] += time.perf_counter() - start
            for right, kl, _ in scored(patched, queries, wants):
                totals[name][:3] = [totals[name][0] + right, totals[name][1] + kl, totals[name][2] + 1]
        print(f"prompt {i + 1}/{args.prompts} (P = {len(prompt)})")
    print(f"\n{args.task}, R = {args.budget}, {args.prompts} prompts\n")
    print(markdown_table(["candidate", "right", "KL(prompted‖x)", "seconds a prompt"],
                        [[name, f"{r} / {n}", number(kl / n), "—" if name == "prompted" else f"{sec / args.prompts:.0f}"]
                         for name, (r, kl, n, sec) in totals.items()]))


if __name__ == "__main__":
    main()
