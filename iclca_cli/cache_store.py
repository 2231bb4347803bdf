"""What iclca keeps between runs because it can recompute it (model fingerprints, family self-tests): small JSON
files in one folder. A store that cannot be read counts as empty, and one that cannot be written only costs time."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import IclcaError
from .outputs import write_file


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
    """Set one key of cache_dir()/name, written atomically (outputs.write_file); a store that cannot be written is
    left as it is."""
    store = cache_dir() / name
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_file(store, json.dumps({**read_store(name), key: value}).encode())
    except (OSError, IclcaError):
        return
