"""scripts/bench.py: the --quick run produces every target of issue 5 with a verdict that follows from
its value, and docs/performance.md shows what --markdown prints from the saved result.
(No timing is asserted here: timings belong to the benchmark, not to unit tests.)"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "scripts/results/bench.json"


def bench(*args: str) -> str:
    return subprocess.run([sys.executable, "scripts/bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def check_targets(result: dict) -> None:
    names = [t["name"] for t in result["targets"]]
    for part in ("linear conversion", "gpt2 conversion", "iclca_linear exact", "gpt2 prefix", "gpt2 taylor1",
                 "gpt2 taylor2", "re-reading / patched", "peak memory", "conversion time"):
        assert any(part in n for n in names), f"no target for {part!r}"
    for t in result["targets"]:
        assert set(t) == {"name", "value", "limit", "holds"}
        assert math.isfinite(t["value"]) and t["value"] > 0, t
        at_least = "speed-up" in t["name"]
        assert t["holds"] == (t["value"] >= t["limit"] if at_least else t["value"] <= t["limit"]), t
    for r in result["query"]:
        assert r["patch_bytes"] > 0 and r["weight_bytes"] > r["patch_bytes"] / 100
        assert all(r[k] > 0 for k in r if k.endswith("_s"))
    sizes: dict[tuple, set] = {}
    for r in result["patch_sizes"]:  # real patches: prefix = the prompt's keys and values, the others constant in P
        if r["method"] == "prefix":
            assert r["patch_bytes"] == r["prompt_kv_bytes"]
        elif r["method"].startswith("compressed"):  # split by heads: padded to a layer's widest head, at most 4R
            R, D = int(r["method"].split("R=")[1].rstrip(")")), 64
            uniform = R * r["prompt_kv_bytes"] // r["P"] * (2 * D + 1) // (2 * D)  # keys, values and a bias
            assert uniform <= r["patch_bytes"] <= 4 * uniform, r
        else:
            sizes.setdefault((r["model"], r["method"]), set()).add(r["patch_bytes"])
    assert sizes and all(len(v) == 1 for v in sizes.values()), sizes


def test_quick_run_reports_every_target(tmp_path):
    result = json.loads(bench("--quick", "--json"))
    assert result["quick"] is True
    check_targets(result)
    saved = tmp_path / "quick.json"
    saved.write_text(json.dumps(result))
    table = bench("--markdown", str(saved))
    assert table.count("\n| ") >= len(result["targets"]) + len(result["query"])


def test_the_performance_page_is_generated_from_the_saved_result():
    result = json.loads(SAVED.read_text())
    assert result["quick"] is False
    check_targets(result)
    assert bench("--markdown", str(SAVED)).strip() in (ROOT / "docs/performance.md").read_text()
