"""Benchmarks with targets: what converting costs, what a patch saves per query, memory and scaling.

    python scripts/bench.py [--quick] [--json]

Every number is a ratio of two timings taken in the same run (the machine is shared and noisy):
each pair is timed interleaved, `repeats` times, and the minimum of each side is used.
Models have random weights (timing does not depend on them): a linear model of the demo's width
without a position table (so prompts can be long), and GPT-2 small's shape (124M parameters).
--quick runs a smaller version of every measurement (shorter prompts, a 2-layer GPT-2).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from common import ROOT, best_of, markdown_table, patched_by, random_gpt2, random_ids, random_linear, tiny_recurrent

from iclca_cli.evaluate import greedy_continuation as greedy
from iclca_cli.patch import apply_patch
from iclca_cli.families import family_of
from iclca_cli.handlers import handler_for
from iclca_cli.methods import build

QUERY, NEW = 16, 32  # query tokens, greedy continuation tokens


def linear_model():
    """The demo's width without a position table, so prompts can be long."""
    return random_linear(position_embedding_type="none", chunk_size=256)


def gpt2_model(quick: bool):
    return random_gpt2(2 if quick else 12)


@torch.no_grad()
def conversion(model, P: int, repeats: int) -> dict:
    """Conversion's pass over the prompt (chunks through the cache, or capture; patch tensors) vs one plain forward
    pass over the same prompt. The model fingerprint (a sha256 over the weights, once per conversion, whatever P)
    is timed apart."""
    from iclca_cli.fingerprint import model_fingerprint

    ids = random_ids(P, model.config.vocab_size)
    x = torch.tensor([ids])
    family = family_of(model)
    method = build("exact" if model.config.model_type == "iclca_linear" else "prefix")
    convert = lambda: handler_for(family).convert(model, family, ids, method, chunk_size=2048)  # noqa: E731
    t = best_of({"convert": convert, "forward": lambda: model.base_model(input_ids=x, use_cache=False),
                 "fingerprint": lambda: model_fingerprint(model)}, repeats)
    return {"model": model.config.model_type, "P": P, "convert_s": t["convert"], "forward_s": t["forward"],
            "fingerprint_s": t["fingerprint"], "ratio": t["convert"] / t["forward"]}


@torch.no_grad()
def query_latency(model, P: int, methods: list[str], repeats: int, tmp: Path) -> list[dict]:
    """A 16-token query plus 32 greedy tokens: patched, merged, re-reading the prompt, prompt KV cache, base."""
    from iclca_cli.merge import merge_patch
    from iclca_cli.loading import load_model

    prompt, query = random_ids(P, model.config.vocab_size, 1), random_ids(QUERY, model.config.vocab_size, 2)
    prompt_cache = model(input_ids=torch.tensor([prompt]), use_cache=True).cache
    rows = []
    for method in methods:
        _, patch = patched_by(model, prompt, method)
        patched = copy.deepcopy(model)  # its own weights: cache effects cannot favour the patched side
        apply_patch(patched, patch)
        folder = tmp / f"merged-{model.config.model_type}-{method}-{P}"
        if not folder.exists():
            from transformers import PreTrainedTokenizerFast
            from tokenizers import Tokenizer, models

            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
            merge_patch(copy.deepcopy(model), tok, patch, folder)
        merged, _ = load_model(str(folder))
        fns = {
            "patched": lambda: greedy(patched, query, NEW),
            "merged": lambda: greedy(merged, query, NEW),
            "reread": lambda: greedy(model, prompt + query, NEW),
            "kv_cache": lambda: greedy(model, query, NEW, copy.deepcopy(prompt_cache)),
            "base": lambda: greedy(model, query, NEW),
            # time to the first new token: the prompt's prefill is what a patch removes
            "patched_first": lambda: greedy(patched, query, 1),
            "reread_first": lambda: greedy(model, prompt + query, 1),
        }
        t = best_of(fns, repeats)
        rows.append({"model": model.config.model_type, "method": method, "P": P, **{f"{k}_s": v for k, v in t.items()},
                     "patch_bytes": patch.nbytes,
                     "weight_bytes": sum(x.numel() * x.element_size() for x in model.parameters())})
    return rows


@torch.no_grad()
def patch_sizes(model, Ps: list[int], methods: list[str]) -> list[dict]:
    """Bytes of real patches as the prompt grows, next to the keys and values a softmax model of the same shape
    caches for the prompt (float32)."""
    from iclca_cli.evaluate import prompt_kv_bytes

    rows = []
    for method in methods:
        for P in Ps:
            _, patch = patched_by(model, random_ids(P, model.config.vocab_size, 3), method, chunk_size=2048)
            name = f"compressed (R={method.split('-')[1]})" if method.startswith("compressed") else method
            rows.append({"model": model.config.model_type, "method": name, "P": P,
                         "patch_bytes": patch.nbytes,
                         "prompt_kv_bytes": prompt_kv_bytes(model.config, P, 4)})
    return rows


MEMORY_CHILD = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[2] + "/scripts")
import torch
torch.set_num_threads(2)
from bench import MEMORY_MODELS
from iclca_cli.convert import convert_prompt
model, P = MEMORY_MODELS[sys.argv[3]](), int(sys.argv[1])
ids = torch.randint(3, 61, (P,), generator=torch.Generator().manual_seed(0)).tolist()
convert_prompt(model, ids[:4096], "-", chunk_size=2048)  # warm-up: first-call allocations are not per token
t0 = time.perf_counter()
convert_prompt(model, ids, "-", chunk_size=2048)
seconds = time.perf_counter() - t0
# VmHWM belongs to this process image; ru_maxrss would keep the parent's peak across fork + exec on Linux.
status = open("/proc/self/status").read() if sys.platform == "linux" else ""
peak = [int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")]
print(seconds, peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def mamba2_model():
    """The tests' tiny Mamba2 (a pure state-space model), with the scan's chunks at Mamba2's default 256."""
    model = tiny_recurrent("mamba2", torch.float32)
    model.config.chunk_size = 256
    for m in model.modules():
        if hasattr(m, "chunk_size"):
            m.chunk_size = 256
    return model


MEMORY_MODELS = {"iclca_linear": linear_model, "mamba2": mamba2_model}


def conversion_memory(model: str, P: int) -> dict:
    """Peak resident memory (KiB) and seconds of converting P tokens, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(P), str(ROOT), model], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()
    return {"model": model, "P": P, "seconds": float(out[0]), "peak_rss_kib": int(out[1])}


def target(name: str, value: float, limit: float, holds: bool) -> dict:
    return {"name": name, "value": value, "limit": limit, "holds": bool(holds)}


def run(quick: bool, tmp: Path) -> dict:
    torch.set_num_threads(2)
    reps = 2 if quick else 5
    lin, gpt = linear_model(), gpt2_model(quick)
    conv = [conversion(lin, P, reps) for P in ((1024, 4096) if quick else (1024, 4096, 16384, 65536))]
    conv_gpt2 = [conversion(gpt, P, reps) for P in ((256,) if quick else (256, 1023))]
    # millisecond timings: more repeats, so that the minimum is not one the shared machine disturbed
    q_lin = [r for P in ((1024,) if quick else (1024, 4096)) for r in query_latency(lin, P, ["exact"], 4 * reps, tmp)]
    q_gpt2 = query_latency(gpt, 128 if quick else 960, ["prefix", "taylor1", "taylor2"], reps, tmp)
    small, big = (16384, 131072) if quick else (65536, 1048576)
    mem = [conversion_memory(model, P) for model in MEMORY_MODELS for P in (small, big)]
    sizes = patch_sizes(lin, [1024, 16384] if quick else [1024, 4096, 16384, 65536], ["exact"])
    sizes += patch_sizes(gpt, [128, 512] if quick else [128, 512, 1023], ["prefix", "taylor1", "taylor2", "compressed-64"])

    targets = []
    for c in conv:
        targets.append(target(f"linear conversion / plain forward, P={c['P']}", c["ratio"], 1.15, c["ratio"] <= 1.15))
    for c in conv_gpt2:
        targets.append(target(f"gpt2 conversion / plain forward, P={c['P']}", c["ratio"], 1.15, c["ratio"] <= 1.15))
    for r in q_lin + q_gpt2:
        label = f"{r['model']} {r['method']} P={r['P']}"
        if r["method"] == "prefix":
            for k in ("patched", "merged"):
                v = r[f"{k}_s"] / r["kv_cache_s"]
                targets.append(target(f"{label}: {k} / prompt KV cache", v, 1.0, v <= 1.0))
        else:
            for k in ("patched", "merged"):
                v = r[f"{k}_s"] / r["base_s"]
                targets.append(target(f"{label}: {k} / base on query", v, 1.10, v <= 1.10))
    for r in q_lin:
        if r["P"] == 4096 or (quick and r["P"] == 1024):
            v = r["reread_s"] / r["patched_s"]
            targets.append(target(f"linear P={r['P']}: re-reading / patched (speed-up)", v, 20.0, v >= 20.0))
    for m_small, m_big in zip(mem[::2], mem[1::2]):
        name = m_small["model"]
        mem_ratio = m_big["peak_rss_kib"] / m_small["peak_rss_kib"]
        targets.append(target(f"{name}: peak memory converting {big} / {small} tokens", mem_ratio, 1.10,
                              mem_ratio <= 1.10))
        time_ratio = (m_big["seconds"] / m_small["seconds"]) / (big / small)
        targets.append(target(f"{name}: conversion time {small} -> {big} tokens / proportional", time_ratio, 1.3,
                              time_ratio <= 1.3))
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "quick": quick, "conversion": conv + conv_gpt2, "query": q_lin + q_gpt2, "memory": mem, "patch_sizes": sizes,
            "targets": targets}


def markdown(result: dict) -> str:
    """docs/performance.md's body from a --json result."""
    parts = [f"Measured with `python scripts/bench.py{' --quick' if result['quick'] else ''} --json` on "
             f"{result['machine']} (2 cores); ratios of timings taken in the same run.",
             markdown_table(["target", "value", "limit", "holds"],
                            [[t["name"], f"{t['value']:.3g}", f"{t['limit']:g}", "yes" if t["holds"] else "**no**"]
                             for t in result["targets"]]),
             "Query latency (16 tokens + 32 greedy tokens, seconds); first token: the query's prefill alone "
             "(re-read: prompt + query); patch bytes: the patch's tensors, as a share of the model's weights.",
             markdown_table(["model", "method", "P", "patched", "merged", "re-read", "prompt KV cache", "base",
                             "first token: patched / re-read", "patch bytes"],
                            [[r["model"], r["method"], r["P"], f"{r['patched_s']:.3g}", f"{r['merged_s']:.3g}",
                              f"{r['reread_s']:.3g}", f"{r['kv_cache_s']:.3g}", f"{r['base_s']:.3g}",
                              f"{r['patched_first_s']:.3g} / {r['reread_first_s']:.3g} "
                              f"({r['reread_first_s'] / r['patched_first_s']:.0f}× faster)",
                              f"{r['patch_bytes']:,} ({r['patch_bytes'] / r['weight_bytes']:.1%})"]
                             for r in result["query"]]),
             markdown_table(["conversion", "P", "convert s", "µs per prompt token", "plain forward s",
                             "fingerprint s (once per conversion)"],
                            [[c["model"], c["P"], f"{c['convert_s']:.3g}", f"{1e6 * c['convert_s'] / c['P']:.3g}",
                              f"{c['forward_s']:.3g}", f"{c['fingerprint_s']:.3g}"] for c in result["conversion"]]),
             markdown_table(["converting", "seconds", "peak RSS MiB"],
                            [[f"{m.get('model', 'iclca_linear')}: {m['P']:,} tokens", f"{m['seconds']:.3g}",
                              f"{m['peak_rss_kib'] / 1024:.0f}"] for m in result["memory"]]),
             "Patch bytes as the prompt grows, against the prompt's keys and values (what a softmax model "
             "of the same shape caches; float32):",
             markdown_table(["model", "method", "P", "patch bytes", "prompt-KV bytes", "ratio"],
                            [[r["model"], r["method"], f"{r['P']:,}", f"{r['patch_bytes']:,}",
                              f"{r['prompt_kv_bytes']:,}", f"{r['patch_bytes'] / r['prompt_kv_bytes']:.3g}"]
                             for r in result["patch_sizes"]])]
    return "\n\n".join(parts)


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller version of every measurement (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--markdown", type=Path, metavar="BENCH_JSON",
                    help="print docs/performance.md's tables from a saved --json result, and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.quick, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"iclca benchmark ({'quick' if args.quick else 'full'}) on {result['machine']}")
    for col in ("target", "value", "limit", "holds"):
        table.add_column(col)
    for t in result["targets"]:
        table.add_row(t["name"], f"{t['value']:.3g}", f"{t['limit']:g}", "yes" if t["holds"] else "NO")
    Console().print(table)


if __name__ == "__main__":
    main()
