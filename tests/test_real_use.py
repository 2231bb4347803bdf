"""scripts/real_use.py (issue 15's measurements on SmolLM2 and demo-linear; minutes, needs SmolLM2) is not run by
the tests: its saved result is what docs/real-use.md shows."""

import json
import subprocess
import sys

from helpers import ROOT


def test_the_real_use_page_is_generated_from_the_saved_result():
    """The saved full run is what docs/real-use.md shows, word for word."""
    saved = ROOT / "scripts/results/real_use.json"
    result = json.loads(saved.read_text())
    assert result["quick"] is False
    proc = subprocess.run([sys.executable, "scripts/real_use.py", "--markdown", str(saved)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() in (ROOT / "docs/real-use.md").read_text()
