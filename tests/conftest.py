"""Fixtures shared by the tests; helpers (tiny models, checks) are in helpers.py."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from helpers import EXAMPLE_PROMPT, EXAMPLE_QUERIES
from iclca_cli.loading import BUILTIN_DIR

from iclca_cli.cli import app


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """The tests' fingerprint cache is their own, never the user's (~/.cache/iclca)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ICLCA_CACHE_DIR", str(tmp_path_factory.mktemp("iclca-cache")))
    yield
    mp.undo()


@pytest.fixture
def cli():
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from iclca_cli.gpt2_tokenizer import offline_gpt2_tokenizer

    return offline_gpt2_tokenizer()


@pytest.fixture
def work(tmp_path, cli):
    """A copy of demo-linear, the example prompt and queries, and a patch of the prompt, in tmp_path."""
    model = tmp_path / "model"
    shutil.copytree(BUILTIN_DIR / "demo-linear", model)
    prompt, queries = tmp_path / "prompt.txt", tmp_path / "queries.jsonl"
    prompt.write_bytes(EXAMPLE_PROMPT.read_bytes())
    queries.write_bytes(EXAMPLE_QUERIES.read_bytes())
    patch = tmp_path / "patch.safetensors"
    assert cli("convert", prompt, "-m", model, "-o", patch).exit_code == 0
    return {"dir": tmp_path, "model": model, "prompt": prompt, "queries": queries, "patch": patch}
