"""Where a training-free `compressed` conversion spends its time (a probe): the pass over prompt + repeat and a plain
forward over the prompt, then the fits from that one capture, timed by function (best of `--repeats` each).

    python scripts/research/compressed_cost.py --length 1024 --budgets 256 341
    python scripts/research/compressed_cost.py --against 2c3599d   # the fits against another commit's, interleaved

Run it on a quiet machine: with another job on the two cores, small batched LAPACK calls (Cholesky of a dozen
132 x 132 systems) took a second each instead of milliseconds, and a profile taken then points at the wrong place.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import best_of  # noqa: E402
from real_model import DEFAULT_FOLDER, random_prompt, smollm2_folder  # noqa: E402

from iclca_cli import summaries  # noqa: E402
from iclca_cli.families import family_of  # noqa: E402
from iclca_cli.loading import load_model  # noqa: E402
from iclca_cli.methods.compressed import Compressed  # noqa: E402
from iclca_cli.ops import compress  # noqa: E402
from iclca_cli.softmax_layers import capture  # noqa: E402

TIMED = [(compress, n) for n in ("reference", "fit_ranked", "nnls", "spd_solve", "largest_eigenvalue", "mass_system")
         ] + [(summaries, "captured_heads")]


def timed(seconds: collections.Counter):
    """Wrap TIMED functions in place so that each call adds its seconds to `seconds` (nested calls count in both)."""
    for module, name in TIMED:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapper(*a, _fn=fn, _name=name, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                seconds[_name] += time.perf_counter() - start

        setattr(module, name, wrapper)


def summaries_at(rev: str):
    """The summaries module of iclca_cli as it was at git revision `rev`, imported as another package."""
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(["git", "archive", rev, "iclca_cli"], cwd=root, capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp())
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "iclca_cli").rename(folder / "iclca_at_rev")
    sys.path.insert(0, str(folder))
    return importlib.import_module("iclca_at_rev.summaries")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 341])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--against", default=None, help="a git revision: time its fits and this tree's, interleaved")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    ids, forward = random_prompt(model, args.length, args.repeats)
    method = Compressed(budget=args.budgets[0])
    both = torch.tensor([method.capture_ids(ids, None)])
    with torch.no_grad():
        best = best_of({"pass": lambda: capture(model, family_of(model), ids, method),
                        "plain": lambda: model.model(input_ids=both, use_cache=False)}, args.repeats)
    captured = capture(model, family_of(model), ids, method)
    print(f"P = {args.length}: a plain forward {forward:.2f} s; the pass over prompt + repeat {best['pass']:.2f} s "
          f"({best['pass'] / forward:.2f} forwards; a plain forward over the same {both.shape[1]} tokens: "
          f"{best['plain'] / forward:.2f})")
    if args.against:
        then = summaries_at(args.against)
        for budget in args.budgets:
            fit = lambda module, budget=budget: module.compressed_tensors(captured, args.length, budget)  # noqa: E731
            best = dict.fromkeys(("here", "then"), float("inf"))
            for i in range(2 * args.repeats):  # in turn, first one and then the other first
                for name in ("here", "then")[::1 if i % 2 else -1]:
                    start = time.perf_counter()
                    fit(summaries if name == "here" else then)
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"R = {budget}: the fits {best['here']:.2f} s here, {best['then']:.2f} s at {args.against} "
                  f"({best['here'] / best['then']:.2f}x; {best['here'] / forward:.2f} against "
                  f"{best['then'] / forward:.2f} forwards)")
    seconds: collections.Counter = collections.Counter()
    timed(seconds)
    for budget in args.budgets:
        fits = []
        for _ in range(args.repeats):
            seconds.clear()
            start = time.perf_counter()
            tensors = summaries.compressed_tensors(captured, args.length, budget)
            fits.append(time.perf_counter() - start)
        held = collections.Counter(n for heads in summaries.head_entries(
            {f"{layer}.{name}": t for layer, bufs in tensors.items() for name, t in bufs.items()}).values() for n in heads)
        print(f"R = {budget}: the fits {min(fits):.2f} s ({min(fits) / forward:.2f} forwards); heads by the entries "
              f"they hold, the largest: {dict(sorted(held.items(), reverse=True)[:4])}; by function (the last "
              "repeat; nested calls count in both):")
        for name, s in seconds.most_common():
            print(f"  {name:20s} {s:.2f} s")


if __name__ == "__main__":
    main()
