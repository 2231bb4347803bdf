"""Sweep random iclca_linear models and print how far patched(query) is from model(prompt + query).

    python scripts/exactness.py [--json]

Models are random (seeded) with logits of real-LM scale; patches go through the library's
convert (forward hooks, chunked), are applied, and the patched model's logits on the query are
compared with the plain model's on prompt + query. Prints the worst max |Δlogit| per dtype.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import iclca_cli  # noqa: F401
from iclca_cli.convert import convert_exact
from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM
from iclca_cli.patch import patched_copy

PROMPTS = [1, 16, 128, 512, 4096]
QUERIES = [1, 64]


def sweep(dtype: torch.dtype, seeds=(0, 1, 2)) -> dict:
    worst, cases = 0.0, 0
    for seed in seeds:
        for feature_map in ("elu+1", "relu"):
            for position in ("learned", "none"):
                torch.manual_seed(seed)
                cfg = IclcaLinearConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        max_position_embeddings=4096 + 64, feature_map=feature_map,
                                        position_embedding_type=position, initializer_range=0.5, chunk_size=256)
                model = IclcaLinearForCausalLM(cfg).to(dtype).eval()
                g = torch.Generator().manual_seed(seed)
                for P in PROMPTS:
                    prompt = torch.randint(0, 97, (P,), generator=g).tolist()
                    patch = convert_exact(copy.deepcopy(model), prompt, "-", chunk_size=512)
                    patched = patched_copy(model, patch)
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
