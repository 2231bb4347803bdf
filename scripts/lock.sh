#!/usr/bin/env bash
# Regenerate constraints.txt: a fresh virtual environment, the CPU build of torch, then the project's test extra at
# the newest releases pyproject.toml allows; the frozen result is the lock that README and CI install.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
env=$(mktemp -d)/lock
python3 -m venv "$env"
"$env/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$env/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
{
  echo "# The exact set of packages CI tests with (pip freeze of a fresh install of .[test], Python 3.11, x86_64)."
  echo "# Install with: pip install torch==2.13.0 && pip install -c constraints.txt -e \".[test]\""
  echo "# Regenerate after changing a pin: scripts/lock.sh"
  "$env/bin/python" -m pip freeze --exclude-editable
} > constraints.txt
rm -rf "$(dirname "$env")"
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages" >&2
