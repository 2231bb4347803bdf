"""`iclca --help` and `iclca <command> --help` answer at once: they import neither torch nor transformers (the
heavy imports happen inside the commands), and importing the package does not either."""

import json
import subprocess
import sys

import pytest

COMMANDS = ["convert", "merge", "eval", "inspect", "export-peft"]
CHECK = r"""
import json, sys
from iclca_cli.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_imports_neither_torch_nor_transformers(args):
    proc = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, timeout=60)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr[-1000:]


def test_importing_the_package_is_light_and_the_models_package_registers_the_auto_classes():
    code = ("import sys, iclca_cli, iclca_cli.errors; light = 'torch' not in sys.modules; "
            "import iclca_cli.models; from transformers import AutoConfig; "
            "print(light, AutoConfig.for_model('iclca_qwen2').model_type, AutoConfig.for_model('iclca_linear').model_type)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "iclca_qwen2", "iclca_linear"], proc.stderr[-1000:]
