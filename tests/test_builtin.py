"""The built-in demo checkpoints are what scripts/train_demo.py makes from the recipes in configs/."""

import hashlib
import json

import pytest

from helpers import ROOT, load_script
from iclca_cli.loading import BUILTIN_DIR, builtin_models, load_model
from iclca_demo.tasks import RecallTask
from iclca_demo.word_tokenizer import build_word_tokenizer


@pytest.mark.parametrize("name", builtin_models())
def test_shipped_checkpoint_matches_its_training_record_and_recipe(name):
    folder = BUILTIN_DIR / name
    record = json.loads((folder / "training.json").read_text())
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == record["model_safetensors_sha256"]
    assert record["recipe"] == json.loads((ROOT / f"configs/models/{name}.json").read_text())
    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    _, tokenizer = load_model(name)
    assert tokenizer.get_vocab() == build_word_tokenizer(task.words).get_vocab()


def test_training_is_deterministic_and_recorded(tmp_path):
    """Two short runs of a recipe give identical weights, and training.json records what was run."""
    train = load_script("train_demo")
    records = [train.train("gpt2", tmp_path / str(i), steps=4, log=lambda *a: None) for i in range(2)]
    assert records[0]["model_safetensors_sha256"] == records[1]["model_safetensors_sha256"]
    assert records[0]["steps"] == 4 and records[0]["curve"][-1]["step"] == 4
    assert hashlib.sha256((tmp_path / "0/demo-gpt2/model.safetensors").read_bytes()).hexdigest() == \
        records[0]["model_safetensors_sha256"]


@pytest.mark.slow  # retrains a demo model: minutes
@pytest.mark.parametrize("name", builtin_models())
def test_shipped_checkpoint_is_what_the_recipe_trains(name, tmp_path):
    """Bit for bit where the recorded environment (torch, transformers, CPU instruction set) is this one."""
    train = load_script("train_demo")
    record = train.train(name.removeprefix("demo-"), tmp_path, log=lambda *a: None)
    shipped = json.loads((BUILTIN_DIR / name / "training.json").read_text())
    assert record["model_safetensors_sha256"] == shipped["model_safetensors_sha256"], \
        f"trained here in {record['environment']}, shipped from {shipped['environment']}"


@pytest.mark.parametrize("name", builtin_models())
def test_shipped_demo_models_learned_in_context(name):
    record = json.loads((BUILTIN_DIR / name / "training.json").read_text())
    assert record["steps"] > 0 and record["final_in_context_accuracy"] >= 0.9


def test_demo_tokenizer_round_trips_the_example_prompt():
    _, tokenizer = load_model("demo-linear")
    text = (ROOT / "configs/examples/recall-prompt.txt").read_text()
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 24
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("river: 3\n").input_ids) == ["river:", "Ġ3", "Ċ"]


@pytest.mark.parametrize("name", builtin_models())
def test_every_demo_model_answers_from_the_patch_as_from_the_prompt(cli, tmp_path, name):
    """The example prompt through the command line with each demo's default method (exact for the linear, state-
    space and hybrid demos, prefix for GPT-2): the patched model answers as the prompted one, which knows the
    answers, and the base model does not."""
    patch = tmp_path / "p.safetensors"
    assert cli("convert", ROOT / "configs/examples/recall-prompt.txt", "-m", name, "-o", patch).exit_code == 0
    res = cli("eval", "-m", name, "-p", patch, "--prompt", ROOT / "configs/examples/recall-prompt.txt", "--queries",
              ROOT / "configs/examples/recall-queries.jsonl", "--max-abs-logit-diff", "1e-3", "--json")
    assert res.exit_code == 0, res.stderr
    accuracy = json.loads(res.stdout)["accuracy"]
    assert accuracy["patched"] == accuracy["prompted"] == 1.0 and accuracy["base"] <= 0.5
