"""The built-in demo checkpoints are what scripts/train_demo.py makes from the recipes in configs/."""

import hashlib
import json

import pytest

from conftest import ROOT
from iclca_cli.fingerprint import model_fingerprint
from iclca_cli.loading import BUILTIN_DIR, builtin_models, load_model
from iclca_cli.tasks import RecallTask
from iclca_cli.word_tokenizer import build_word_tokenizer
from test_demo_training import load_script


@pytest.mark.parametrize("name", builtin_models())
def test_shipped_checkpoint_matches_its_training_record_and_recipe(name):
    folder = BUILTIN_DIR / name
    record = json.loads((folder / "training.json").read_text())
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == record["model_safetensors_sha256"]
    assert record["recipe"] == json.loads((ROOT / f"configs/models/{name}.json").read_text())
    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    _, tokenizer = load_model(name)
    assert tokenizer.get_vocab() == build_word_tokenizer(task.words).get_vocab()


def test_untrained_builtins_are_rebuilt_bit_for_bit():
    """A checkpoint of 0 training steps is the recipe's seeded initialisation: rebuild it and compare."""
    train = load_script("train_demo")
    for name in builtin_models():
        record = json.loads((BUILTIN_DIR / name / "training.json").read_text())
        if record["steps"] == 0:
            task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
            rebuilt = train.build_model(name.removeprefix("demo-"), record["recipe"], build_word_tokenizer(task.words))
            assert model_fingerprint(rebuilt) == model_fingerprint(load_model(name)[0])


def test_demo_tokenizer_round_trips_the_example_prompt():
    _, tokenizer = load_model("demo-linear")
    text = (ROOT / "configs/examples/recall-prompt.txt").read_text()
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 24
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("river: 3\n").input_ids) == ["river:", "Ġ3", "Ċ"]
