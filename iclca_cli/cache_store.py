"""What iclca keeps between runs because it can recompute it (model fingerprints, family self-tests): small JSON
files in one folder. A store that cannot be read counts as empty, and one that cannot be written only costs time."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where iclca keeps what it can recompute: $ICLCA_CACHE_DIR, else ~/.cache/iclca."""
    return Path(os.environ.get("ICLCA_CACHE_DIR") or Path.home() / ".cache" / "iclca")


def read_store(name: str) -> dict:
    """The JSON object in cache_dir()/name; {} if it is missing, unreadable or not an object."""
    try:
        known = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return known if isinstance(known, dict) else {}


def add_to_store(name: str, key: str, value) -> None:
    """Set one key of cache_dir()/name, written atomically (a temporary file beside it, then a rename)."""
    store = cache_dir() / name
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=store.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**read_store(name), key: value}, f)
        os.replace(tmp, store)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
