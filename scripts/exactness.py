"""Sweep random iclca_linear models and print how far patched(query) is from model(prompt + query).

    python scripts/exactness.py [--json]

Models are random (seeded) with logits of real-LM scale; patches go through the library's
convert (the prompt run in chunks through the model's cache), are applied, and the patched model's logits on the
query are compared with the plain model's on prompt + query. Prints the worst max |Δlogit| per dtype.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import patched_by, random_linear

PROMPTS = [1, 16, 128, 512, 4096]
QUERIES = [1, 64]


def sweep(dtype: torch.dtype, seeds=(0, 1, 2)) -> dict:
    worst, cases = 0.0, 0
    for seed in seeds:
        for feature_map in ("elu+1", "relu"):
            for position in ("learned", "none"):
                model = random_linear(seed, dtype, vocab_size=97, hidden_size=64, num_hidden_layers=3,
                                      max_position_embeddings=4096 + 64, feature_map=feature_map,
                                      position_embedding_type=position, initializer_range=0.5, chunk_size=256)
                g = torch.Generator().manual_seed(seed)
                for P in PROMPTS:
                    prompt = torch.randint(0, 97, (P,), generator=g).tolist()
                    patched, _ = patched_by(model, prompt, "exact")
                    for Q in QUERIES:
                        query = torch.randint(0, 97, (Q,), generator=g).tolist()
                        with torch.no_grad():
                            want = model(input_ids=torch.tensor([prompt + query])).logits[0, P:]
                            got = patched(input_ids=torch.tensor([query])).logits[0]
                        worst = max(worst, (got - want).abs().max().item())
                        cases += 1
    return {"cases": cases, "worst_max_abs_logit_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"prompt_tokens": PROMPTS, "query_tokens": QUERIES,
              "float64": sweep(torch.float64), "float32": sweep(torch.float32)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"prompts {PROMPTS} tokens x queries {QUERIES} tokens, 3 seeds x 2 feature maps x 2 position types")
    for dt in ("float64", "float32"):
        r = result[dt]
        print(f"{dt}: {r['cases']} cases, worst max |Δlogit| = {r['worst_max_abs_logit_diff']:.3g}")


if __name__ == "__main__":
    main()
