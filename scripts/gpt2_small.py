"""GPT-2 small shape (124M parameters, random weights, no download): prefix exactness, Taylor
fidelity and patch sizes.

    python scripts/gpt2_small.py [--json]

Weights are GPT-2's initialisation (std 0.02), so this shows exactness and sizes, not what a
trained GPT-2 does with Taylor patches (see scripts/ for the demo models for that).
Prompts are seeded random token ids; a query is 16 tokens. GPT-2 has 1024 positions, so the
longest prompt that leaves room for one query token is 1023 tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import patched_by, random_gpt2

from iclca_cli.evaluate import greedy_continuation, kl_divergence

METHODS = ("prefix", "taylor1", "taylor2")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (1024,), generator=g).tolist()
    P, Q = 256, 16
    prompt, query = ids[:P], ids[P : P + Q]
    result = {"parameters": None, "prompt_tokens": P, "query_tokens": Q, "rows": [], "sizes": []}
    t0 = time.perf_counter()
    for dtype in (torch.float64, torch.float32):
        model = random_gpt2(dtype=dtype)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        prompted = model(input_ids=torch.tensor([prompt + query])).logits[0, P:]
        base = model(input_ids=torch.tensor([query])).logits[0]
        for method in METHODS if dtype == torch.float64 else ("prefix",):
            patched, _ = patched_by(model, prompt, method)
            out = patched(input_ids=torch.tensor([query])).logits[0]
            row = {"dtype": str(dtype).removeprefix("torch."), "method": method,
                   "max_abs_logit_diff": float((out - prompted).abs().max()), "kl_prompted_patched": float(kl_divergence(prompted, out).mean()),
                   "kl_prompted_base": float(kl_divergence(prompted, base).mean())}
            if method == "prefix":
                row["greedy_32_identical"] = greedy_continuation(patched, query, 32) == greedy_continuation(model, prompt + query, 32)
            result["rows"].append(row)
            del patched
    model = random_gpt2(dtype=torch.float32)
    for p in (256, 1023):
        result["sizes"].append({"prompt_tokens": p, **{m: patched_by(model, ids[:p], m)[1].nbytes for m in METHODS}})
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"GPT-2 small shape, {result['parameters'] / 1e6:.1f}M parameters, random init; P={P}, query {Q} tokens")
    print(f"{'dtype':8} {'method':8} {'max|Δlogit|':>12} {'KL(prompted‖patched)':>21} {'KL(prompted‖base)':>18}")
    for r in result["rows"]:
        extra = f"  greedy 32 identical: {r['greedy_32_identical']}" if "greedy_32_identical" in r else ""
        print(f"{r['dtype']:8} {r['method']:8} {r['max_abs_logit_diff']:12.3g} {r['kl_prompted_patched']:21.3g} "
              f"{r['kl_prompted_base']:18.3g}{extra}")
    print("patch bytes (float32):")
    for s in result["sizes"]:
        print(f"  P={s['prompt_tokens']:5}: prefix {s['prefix'] / 2**20:7.1f} MiB, taylor1 {s['taylor1'] / 2**20:6.1f} MiB, "
              f"taylor2 {s['taylor2'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
