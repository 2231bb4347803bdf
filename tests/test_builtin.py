"""The built-in demo-linear checkpoint is the one scripts/build_builtin.py produces."""

import importlib.util

from conftest import ROOT
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.loading import builtin_models, load_model


def test_shipped_demo_linear_is_what_the_build_script_makes():
    spec = importlib.util.spec_from_file_location("build_builtin", ROOT / "scripts/build_builtin.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    model, tokenizer = build.build_demo_linear()
    shipped, shipped_tokenizer = load_model("demo-linear")
    assert model_fingerprint(shipped) == model_fingerprint(model)
    assert shipped_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert "demo-linear" in builtin_models()


def test_demo_tokenizer_round_trips_the_example_prompt():
    _, tokenizer = load_model("demo-linear")
    text = (ROOT / "configs/examples/recall-prompt.txt").read_text()
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("river: 3\n").input_ids) == ["river", ":", "Ġ3", "Ċ"]
