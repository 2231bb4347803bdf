"""Reference metrics of the approximate methods, stored so that a change that makes them worse fails a test
(tests/test_reference_metrics.py), not only a table in docs/.

    python scripts/reference_metrics.py            # print the metrics as JSON
    python scripts/reference_metrics.py --write    # store them in tests/reference_metrics.json

Two setups, both deterministic and seconds long:
- demo-gpt2 (trained to look values up in context) on 20 fresh recall prompts, as in reproduce.py: accuracy and
  KL(prompted || patched) of taylor1, taylor2, compressed and evict (budget P/3);
- a tiny random grouped-query Llama and a soft-capped, sliding-window Gemma 2 (float64) on one 60-token prompt:
  KL of compressed and evict (budget 8) and, for Llama, taylor1 / taylor2, through the rotary and soft-cap paths.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import ROOT, patched_by, random_decoder, random_ids
from reproduce import table

from iclca_cli.evaluate import kl_divergence

STORED = ROOT / "tests/reference_metrics.json"
DEMO_PROMPTS = 20


@torch.no_grad()
def tiny_model_metrics() -> dict:
    out = {}
    models = {"llama": random_decoder("Llama", seed=3),
              "gemma2": random_decoder("Gemma2", seed=4, head_dim=16, attn_logit_softcapping=3.0, sliding_window=16,
                                       query_pre_attn_scalar=16)}
    for name, model in models.items():
        model.set_attn_implementation("iclca_patch")  # float64 throughout (Gemma 2's own takes softmax in float32)
        prompt, query = random_ids(60, 97, 5), random_ids(8, 97, 6)
        want = model(input_ids=torch.tensor([prompt + query])).logits[0, 60:]
        for method in ("compressed-8", "evict-8", *(("taylor1", "taylor2") if name == "llama" else ())):
            patched, _ = patched_by(model, prompt, method)
            got = patched(input_ids=torch.tensor([query])).logits[0]
            out[f"tiny-{name} {method}"] = {"kl": float(kl_divergence(want, got).mean())}
    return out


def metrics() -> dict:
    rows = table(["demo-gpt2"], DEMO_PROMPTS)
    out = {f"demo-gpt2 {r['method']}": {"accuracy": r["accuracy"], "kl": r["kl"]}
           for r in rows if r["method"] in ("taylor1", "taylor2", "compressed", "evict")}
    return {**out, **tiny_model_metrics()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"store the metrics in {STORED.relative_to(ROOT)}")
    args = ap.parse_args()
    result = metrics()
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.write:
        STORED.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
