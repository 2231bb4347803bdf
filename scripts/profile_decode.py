"""Where a decode step's time goes: one greedy step of the benchmark's models, plain and patched.

    python scripts/profile_decode.py [--quick] [--rows 8]

Prints, per model and method, the seconds of one incremental decode step (best of many, after a
16-token query) and the torch profiler's top operators by self CPU time. This is the profile behind
docs/performance.md's notes on the two benchmark targets that do not hold.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from bench import QUERY, gpt2_model, linear_model
from common import patched_by, random_ids

from iclca_cli.patch import apply_patch


@torch.inference_mode()
def step_profile(model, query: list[int], repeats: int, rows: int) -> tuple[float, str]:
    """Seconds of one decode step after `query` (best of `repeats`) and the profiler's top `rows` operators."""
    cache = model(input_ids=torch.tensor([query]), use_cache=True).cache
    caches = [copy.deepcopy(cache) for _ in range(repeats + 10)]  # a step may grow its cache in place
    x = torch.tensor([[query[-1]]])
    best = float("inf")
    for c in caches[:repeats]:
        t0 = time.perf_counter()
        model(input_ids=x, cache=c, use_cache=True)
        best = min(best, time.perf_counter() - t0)
    with torch.profiler.profile() as prof:
        for c in caches[repeats:]:
            model(input_ids=x, cache=c, use_cache=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return best, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer GPT-2 instead of the 12-layer small shape")
    ap.add_argument("--rows", type=int, default=8, help="profiler rows per model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lin, gpt = linear_model(), gpt2_model(args.quick)
    cases = []
    for model, P, methods in ((lin, 4096, ["exact"]), (gpt, 960, ["taylor1", "taylor2"])):
        prompt = random_ids(P, model.config.vocab_size, 1)
        query = random_ids(QUERY, model.config.vocab_size, 2)
        cases.append((f"{model.config.model_type} base", model, query))
        for method in methods:
            patched = copy.deepcopy(model)  # its own weights, as in bench.py
            apply_patch(patched, patched_by(model, prompt, method)[1])
            cases.append((f"{model.config.model_type} {method} P={P}", patched, query))
    for name, model, query in cases:
        seconds, table = step_profile(model, query, 200 if name.startswith("iclca_linear") else 20, args.rows)
        print(f"## {name}: one decode step {seconds * 1e3:.3f} ms\n{table}")


if __name__ == "__main__":
    main()
