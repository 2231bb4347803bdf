"""The family self-test (selftest.py): every family with a published tiny layout is exact on the installed
transformers; a transformers on which a family's patches would be wrong is refused with one line, at convert and at
merge, before anything is written; a pass is remembered per version."""

import pytest
import torch
import transformers
from transformers.cache_utils import Cache

from helpers import assert_one_line_error, make_recurrent, save_checkpoint
from iclca_cli import selftest
from iclca_cli.cache_store import read_store
from iclca_cli.errors import IclcaError
from iclca_cli.families import all_families, family_named

TINY = [name for name, family in all_families().items() if family.tiny is not None]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No pass remembered: an empty store and an empty in-process set."""
    monkeypatch.setenv("ICLCA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(selftest, "_passed", set())


def counting_from_zero(monkeypatch):
    """Simulate a transformers on which a cache family's fix no longer holds: every cache reports no tokens seen, so
    a model continuing from the prompt's cache numbers the query's positions from 0 (the stock model on prompt +
    query, which starts from an empty cache, is unchanged)."""
    monkeypatch.setattr(Cache, "get_seq_length", lambda self, layer_idx=0: 0)


def test_every_cache_family_declares_its_published_layout():
    cache = [name for name, family in all_families().items() if family.positions == "cache"]
    assert cache and set(cache) <= set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_every_family_passes_its_self_test_on_the_installed_transformers(name):
    family = family_named(name)
    error, reach = selftest.exactness_errors(family)
    assert error <= selftest.bound(family) <= 1e-5
    assert reach > 1e3 * selftest.bound(family)  # the prompt moves the logits far beyond the bound


def test_a_family_whose_fix_does_not_hold_is_refused(fresh, monkeypatch):
    counting_from_zero(monkeypatch)
    with pytest.raises(IclcaError) as e:
        selftest.check_family(family_named("lfm2"))
    assert e.value.message.startswith(f"lfm2 patches are not exact on transformers {transformers.__version__}")
    assert "pip install 'transformers==" in e.value.hint
    assert not read_store(selftest.STORE)  # a failure is not remembered
    selftest.check_family(family_named("mamba2"))  # a family without attention layers does not count positions


def test_convert_refuses_the_family_with_one_line_and_writes_nothing(cli, fresh, monkeypatch, tmp_path):
    folder = save_checkpoint(make_recurrent("lfm2", torch.float32, seed=5), tmp_path / "lfm2")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\n")
    counting_from_zero(monkeypatch)
    res = cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st")
    assert_one_line_error(res, "lfm2 patches are not exact on transformers")
    assert not (tmp_path / "p.st").exists()


def test_merge_of_a_patch_made_where_the_fix_held_is_refused_where_it_does_not(cli, fresh, monkeypatch, tmp_path):
    folder = save_checkpoint(make_recurrent("qwen3_next", torch.float32, seed=5), tmp_path / "qwen3_next")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("alpha: one\nbeta: two\n")
    assert cli("convert", prompt, "-m", folder, "-o", tmp_path / "p.st").exit_code == 0
    monkeypatch.setattr(selftest, "_passed", set())
    monkeypatch.setenv("ICLCA_CACHE_DIR", str(tmp_path / "other-cache"))
    counting_from_zero(monkeypatch)
    res = cli("merge", "-m", folder, "-p", tmp_path / "p.st", "-o", tmp_path / "merged")
    assert_one_line_error(res, "qwen3_next patches are not exact")
    assert not (tmp_path / "merged").exists()


def test_a_pass_is_remembered_per_transformers_version(fresh, monkeypatch):
    family = family_named("lfm2")
    assert f"transformers={transformers.__version__} " in selftest.key(family)
    selftest.check_family(family)
    assert selftest.key(family) in read_store(selftest.STORE)
    monkeypatch.setattr(selftest, "_passed", set())
    monkeypatch.setattr(selftest, "exactness_errors", lambda family: (1.0, 1.0))  # would fail if it ran
    selftest.check_family(family)  # remembered on disk: not run again
    monkeypatch.setattr(selftest, "key", lambda family: "lfm2 transformers=99.0.0")  # another installation
    with pytest.raises(IclcaError, match="1 off"):
        selftest.check_family(family)


def test_an_unreadable_store_counts_as_empty(fresh, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / selftest.STORE).write_text("[" * 100_000)  # nested too deep for json
    selftest.check_family(family_named("mamba2"))
    assert list(read_store(selftest.STORE)) == [selftest.key(family_named("mamba2"))]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [selftest.STORE]  # no temporary file left
