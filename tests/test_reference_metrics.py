"""The approximate methods must not get worse: their metrics on fixed setups (scripts/reference_metrics.py) against
the stored ones. An improvement passes; store it with `python scripts/reference_metrics.py --write`."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT

STORED = json.loads((ROOT / "tests/reference_metrics.json").read_text())


@pytest.fixture(scope="module")
def measured():
    """The script's printout, run as a user runs it (the tests build no model through a script's code)."""
    proc = subprocess.run([sys.executable, "scripts/reference_metrics.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


def test_the_same_setups_are_measured(measured):
    assert set(measured) == set(STORED)


@pytest.mark.parametrize("name", sorted(STORED))
def test_no_approximate_method_got_worse(measured, name):
    now, then = measured[name], STORED[name]
    assert now["kl"] <= then["kl"] * 1.01 + 1e-9, f"{name}: KL {now['kl']:.4g}, stored {then['kl']:.4g}"
    if "accuracy" in then:  # 160 queries: one flipped answer is 0.006
        assert now["accuracy"] >= then["accuracy"] - 0.013, f"{name}: accuracy {now['accuracy']}, stored {then['accuracy']}"
