"""The checks that need a GPU, ready for a machine with one: golden tests on the device in float32 and bfloat16, the
command line with --device, and the benchmark's GPU rows.

    python scripts/gpu_check.py [--device cuda] [--quick] [--out scripts/results/gpu_check.json] [--markdown FILE]

1. Golden: for a tiny random model of each family below, on the device, convert + apply against the model on
   prompt + query (one pass, same device and dtype): max |Δlogit| against a yardstick of the same run, the prompted
   model in this dtype against one step up (bfloat16 against float32 on the device; float32 against float64 on
   the CPU); holds when ≤ 2× the yardstick and top-1 agreement ≥ 0.99; greedy generate() of 16 tokens compared.
2. The command line: `iclca convert` / `iclca eval --device DEVICE --json` on demo-gpt2 and demo-mamba2.
3. Benchmark rows: GPT-2 small (random weights) conversion against a plain forward at P = 1023, and a 16-token
   query + 32 greedy tokens, patched (prefix, taylor1) against re-reading the prompt and the base model; the linear
   model's re-read / patched speed-up at P = 4096. Timings synchronise the device; ratios of one run.
4. Refine: `convert --method compressed --budget 4 --refine --lr 0.02` on demo-gpt2 and demo-lfm2 on the device, float32
   and (on a GPU) bfloat16 under autocast: the refined summary's KL to the prompted model on the example queries
   against the fitted one's, and both conversions' seconds.
5. LoRA: `convert --method lora --lr 0.01 --train-on lines` on demo-gpt2 and demo-lfm2 the same way: the patched
   model's KL to the prompted model on the example queries against the plain model's, and the seconds training took.
`--device cpu --quick` runs everything small on the CPU (a test does, so the script keeps working without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
from common import (ROOT, best_of, cli, markdown_table, number, patched_by, random_decoder, random_gpt2, random_ids,
                    random_linear, report, result_arguments, show_saved, tiny_recurrent)

from iclca_cli.convert import convert_prompt
from iclca_cli.evaluate import greedy_continuation, top1_agrees
from iclca_cli.patch import patched_copy

P, Q, NEW = 40, 8, 16
FAMILIES = {
    "iclca_linear": lambda: random_linear(70, torch.float64, vocab_size=97, position_embedding_type="none"),
    "gpt2": lambda: random_gpt2(2, torch.float64, seed=71),
    "llama": lambda: random_decoder("Llama", torch.float64, 72),
    "qwen2 (sliding 8)": lambda: random_decoder("Qwen2", torch.float64, 73, use_sliding_window=True, sliding_window=8,
                                                layer_types=["sliding_attention", "full_attention"]),
    "gemma2": lambda: random_decoder("Gemma2", torch.float64, 76, head_dim=16, attn_logit_softcapping=3.0,
                                     query_pre_attn_scalar=16, sliding_window=8),
    "mamba2": lambda: tiny_recurrent("mamba2", torch.float64, 80),
    "lfm2": lambda: tiny_recurrent("lfm2", torch.float64, 81),
    "qwen3_next": lambda: tiny_recurrent("qwen3_next", torch.float64, 88),
    "falcon_h1": lambda: tiny_recurrent("falcon_h1", torch.float64, 82),
}


@torch.no_grad()
def logits(model, ids: list[int], device) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].double().cpu()  # (T, V)


def golden_rows(device: torch.device, dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    for name, make in FAMILIES.items():
        model64 = make()  # float64, CPU: the source of every copy, and float32's yardstick
        ids = [i + 3 for i in random_ids(P + Q, min(model64.config.vocab_size, 61) - 3, 1)]
        for dtype in dtypes:
            model = copy.deepcopy(model64).to(device=device, dtype=dtype)
            if dtype == torch.float32:
                above = logits(model64, ids, "cpu")[P:]
            else:
                above = logits(copy.deepcopy(model64).to(device=device, dtype=torch.float32), ids, device)[P:]
            prompted = logits(model, ids, device)[P:]
            patch = convert_prompt(model, ids[:P], "-")
            patched = patched_copy(model, patch)
            got = logits(patched, ids[P:], device)
            yardstick = float((prompted - above).abs().max())
            diff = float((got - prompted).abs().max())
            agree = float(top1_agrees(prompted, got).double().mean())
            same_greedy = greedy_continuation(patched, ids[P:], NEW) == greedy_continuation(model, ids, NEW)
            rows.append({"family": name, "dtype": str(dtype).removeprefix("torch."), "method": patch.method.name,
                         "max_abs_logit_diff": diff, "yardstick": yardstick, "top1_agreement": agree,
                         "greedy_identical": same_greedy,
                         "holds": diff <= 2 * max(yardstick, 1e-12) and agree >= 0.99})
    return rows


def cli_rows(device: torch.device, tmp: Path) -> list[dict]:
    prompt, queries = ROOT / "configs/examples/recall-prompt.txt", ROOT / "configs/examples/recall-queries.jsonl"
    rows = []
    for model in ("demo-gpt2", "demo-mamba2"):
        cli("convert", prompt, "-m", model, "-o", tmp / f"{model}.st", "--device", str(device))
        report = json.loads(cli("eval", "-m", model, "-p", tmp / f"{model}.st", "--prompt", prompt, "--queries",
                                queries, "--device", str(device), "--json"))
        rows.append({"model": model, "max_abs_logit_diff": report["max_abs_logit_diff"],
                     "accuracy": report["accuracy"], "holds": report["accuracy"]["patched"] == report["accuracy"]["prompted"]})
    return rows


def refine_rows(device: torch.device, tmp: Path, quick: bool) -> list[dict]:
    """`convert --method compressed --budget 4 --refine --lr 0.02` on the device (bfloat16 autocast on CUDA), against the fitted
    summary: eval's KL to the prompted model on the example queries (never trained on), and the seconds each took."""
    import time

    prompt, queries = ROOT / "configs/examples/recall-prompt.txt", ROOT / "configs/examples/recall-queries.jsonl"
    dtypes = ["float32"] if device.type == "cpu" else ["float32", "bfloat16"]
    rows = []
    for model in ("demo-gpt2", "demo-lfm2"):
        for dtype in dtypes:
            row = {"model": model, "dtype": dtype}
            for name, extra in (("fitted", ()), ("refined", ("--refine", "--steps", "10" if quick else "100",
                                                             "--lr", "0.02"))):  # the tiny demos take a larger rate
                patch = tmp / f"{model}-{dtype}-{name}.st"
                start = time.perf_counter()
                cli("convert", prompt, "-m", model, "-o", patch, "--method", "compressed", "--budget", "4",
                    "--device", str(device), "--dtype", dtype, *extra)
                row[f"{name}_seconds"] = time.perf_counter() - start
                row[f"kl_{name}"] = json.loads(cli("eval", "-m", model, "-p", patch, "--prompt", prompt, "--queries",
                                                   queries, "--device", str(device), "--json"))["kl_prompted_patched"]
            row["holds"] = row["kl_refined"] < row["kl_fitted"]
            rows.append(row)
    return rows


def lora_rows(device: torch.device, tmp: Path, quick: bool) -> list[dict]:
    """`convert --method lora --lr 0.01 --train-on lines` on the device (bfloat16 autocast on CUDA): eval's KL of the
    patched and of the plain model to the prompted one on the example queries (never trained on), and the seconds."""
    import time

    prompt, queries = ROOT / "configs/examples/recall-prompt.txt", ROOT / "configs/examples/recall-queries.jsonl"
    rows = []
    for model in ("demo-gpt2", "demo-lfm2"):
        for dtype in ["float32"] if device.type == "cpu" else ["float32", "bfloat16"]:
            patch = tmp / f"{model}-{dtype}-lora.st"
            start = time.perf_counter()
            cli("convert", prompt, "-m", model, "-o", patch, "--method", "lora", "--steps", "20" if quick else "200",
                "--lr", "0.01", "--train-on", "lines", "--device", str(device), "--dtype", dtype)
            seconds = time.perf_counter() - start
            report = json.loads(cli("eval", "-m", model, "-p", patch, "--prompt", prompt, "--queries", queries,
                                    "--device", str(device), "--json"))
            rows.append({"model": model, "dtype": dtype, "seconds": seconds, "kl_base": report["kl_prompted_base"],
                         "kl_lora": report["kl_prompted_patched"],
                         "holds": report["kl_prompted_patched"] < report["kl_prompted_base"]})
    return rows


@torch.no_grad()
def bench_rows(device: torch.device, quick: bool) -> list[dict]:
    from iclca_cli.families import family_of
    from iclca_cli.methods import build
    from iclca_cli.softmax_layers import convert

    repeats = 2 if quick else 5
    gpt = random_gpt2(2 if quick else 12).to(device)
    Pg = 128 if quick else 1023
    prompt, query = random_ids(Pg, gpt.config.vocab_size, 1), random_ids(16, gpt.config.vocab_size, 2)
    x = torch.tensor([prompt], device=device)
    t = best_of({"convert": lambda: convert(gpt, family_of(gpt), prompt, build("prefix")),
                 "forward": lambda: gpt.base_model(input_ids=x, use_cache=False)}, repeats, device)
    rows = [{"name": f"gpt2 conversion / plain forward, P={Pg}", "value": t["convert"] / t["forward"]}]
    for method in ("prefix", "taylor1"):
        patched, _ = patched_by(gpt, prompt, method)
        t = best_of({"patched": lambda: greedy_continuation(patched, query, 32),
                     "reread": lambda: greedy_continuation(gpt, prompt + query, 32),
                     "base": lambda: greedy_continuation(gpt, query, 32)}, repeats, device)
        rows.append({"name": f"gpt2 {method} P={Pg}: patched / base on query", "value": t["patched"] / t["base"]})
        rows.append({"name": f"gpt2 {method} P={Pg}: re-reading / patched (speed-up)", "value": t["reread"] / t["patched"]})
    lin = random_linear(position_embedding_type="none", chunk_size=256).to(device)
    Pl = 1024 if quick else 4096
    prompt, query = random_ids(Pl, lin.config.vocab_size, 3), random_ids(16, lin.config.vocab_size, 4)
    patched, _ = patched_by(lin, prompt, "exact")
    t = best_of({"patched": lambda: greedy_continuation(patched, query, 32),
                 "reread": lambda: greedy_continuation(lin, prompt + query, 32)}, repeats, device)
    rows.append({"name": f"linear exact P={Pl}: re-reading / patched (speed-up)", "value": t["reread"] / t["patched"]})
    return rows


def markdown(r: dict) -> str:
    return "\n\n".join([
        f"Measured with `python scripts/gpu_check.py --device {r['device']}{' --quick' if r['quick'] else ''}` on "
        f"{r['machine']}.",
        markdown_table(["family", "dtype", "method", "max abs Δlogit", "yardstick", "top-1", "greedy 16 identical",
                        "holds"],
                       [[g["family"], g["dtype"], g["method"], number(g["max_abs_logit_diff"]), number(g["yardstick"]),
                         f"{g['top1_agreement']:.2f}", "yes" if g["greedy_identical"] else "no",
                         "yes" if g["holds"] else "**no**"] for g in r["golden"]]),
        markdown_table(["command line", "max abs Δlogit", "accuracy (base / prompted / patched)"],
                       [[c["model"], number(c["max_abs_logit_diff"]), " / ".join(f"{v:.2f}" for v in c["accuracy"].values())]
                        for c in r["cli"]]),
        markdown_table(["refine (compressed, R = 4)", "dtype", "KL fitted", "KL refined", "convert s: fitted",
                        "refined", "holds"],
                       [[x["model"], x["dtype"], number(x["kl_fitted"]), number(x["kl_refined"]),
                         f"{x['fitted_seconds']:.1f}", f"{x['refined_seconds']:.1f}", "yes" if x["holds"] else "**no**"]
                        for x in r.get("refine", [])]),
        markdown_table(["lora", "dtype", "KL plain", "KL lora", "convert s", "holds"],
                       [[x["model"], x["dtype"], number(x["kl_base"]), number(x["kl_lora"]), f"{x['seconds']:.1f}",
                         "yes" if x["holds"] else "**no**"] for x in r.get("lora", [])]),
        markdown_table(["benchmark row", "value"], [[b["name"], f"{b['value']:.3g}"] for b in r["bench"]]),
    ])


def main() -> None:
    import tempfile

    from iclca_cli.devices import torch_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (the test runs this on the CPU)")
    result_arguments(ap)
    args = ap.parse_args()
    if show_saved(args, markdown):
        return
    device = torch_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    result = {"device": args.device, "quick": args.quick, "machine": f"{name}, torch {torch.__version__}"}
    print("golden ...", file=sys.stderr)
    result["golden"] = golden_rows(device, [torch.float32, torch.bfloat16])
    with tempfile.TemporaryDirectory() as tmp:
        print("command line ...", file=sys.stderr)
        result["cli"] = cli_rows(device, Path(tmp))
        print("refine ...", file=sys.stderr)
        result["refine"] = refine_rows(device, Path(tmp), args.quick)
        print("lora ...", file=sys.stderr)
        result["lora"] = lora_rows(device, Path(tmp), args.quick)
    print("benchmark ...", file=sys.stderr)
    result["bench"] = bench_rows(device, args.quick)
    result["holds"] = all(x["holds"] for x in result["golden"] + result["cli"] + result["refine"] + result["lora"])
    report(args, result, markdown)


if __name__ == "__main__":
    main()
