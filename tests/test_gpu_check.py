"""scripts/gpu_check.py is run on a GPU when a session has one; here it runs small on the CPU so that it keeps
working: every golden row holds (exact and prefix patches within twice the yardstick of the same run, float32 and
bfloat16), the command line answers as prompted, a refined summary is closer to the prompted model than the fitted one, a
lora patch closer than the plain model, and
every benchmark row has a positive value."""

import json
import subprocess
import sys

from helpers import ROOT


def test_the_gpu_check_runs_on_the_cpu_and_its_golden_rows_hold():
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {(g["family"], g["dtype"]) for g in result["golden"]} >= {("llama", "bfloat16"), ("mamba2", "float32")}
    assert all(g["holds"] for g in result["golden"]), [g for g in result["golden"] if not g["holds"]]
    assert all(c["holds"] and c["accuracy"]["prompted"] == 1.0 for c in result["cli"])
    assert result["bench"] and all(b["value"] > 0 for b in result["bench"])
    assert {r["model"] for r in result["refine"]} == {"demo-gpt2", "demo-lfm2"} and all(r["holds"] for r in result["refine"])
    assert {r["model"] for r in result["lora"]} == {"demo-gpt2", "demo-lfm2"} and all(r["holds"] for r in result["lora"])
