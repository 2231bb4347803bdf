"""The demo training data: what the trainer feeds is the task's text, as the tokenizer encodes it."""

import random

import torch

from helpers import ROOT, load_script
from iclca_demo.tasks import RecallTask
from iclca_demo.word_tokenizer import build_word_tokenizer


def test_training_batches_are_the_tasks_text_and_labels_are_the_query_values():
    train = load_script("train_demo")
    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    tok = build_word_tokenizer(task.words)
    x, labels = train.RecallBatches(task, tok).sample(torch.Generator().manual_seed(0), 4, pairs=5, queries=7)
    for ids, lab in zip(x.tolist(), labels.tolist()):
        text = tok.decode(ids)
        assert tok(text).input_ids == ids and tok.unk_token_id not in ids
        lines = text.splitlines()
        assert len(lines) == 12 and all(len(line.split(": ")) == 2 for line in lines)
        prompt = dict(line.split(": ") for line in lines[:5])
        assert len(prompt) == 5  # distinct keys
        answers = [tok.decode([t]) for t in lab if t != -100]
        assert answers == [" " + prompt[line.split(": ")[0]] for line in lines[5:]]


def test_task_samples_fresh_mappings_in_the_format():
    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    prompt, queries = task.sample(random.Random(0))
    lines = prompt.splitlines()
    assert len(lines) == task.pairs_per_prompt and len(queries) == task.pairs_per_prompt
    mapping = dict(line.split(": ") for line in lines)
    assert all(q.target == " " + mapping[q.input.removesuffix(":")] for q in queries)
    assert task.sample(random.Random(1))[0] != prompt


def test_reproduce_prints_the_table_schema():
    """scripts/reproduce.py --json: one object {"rows": [...]} with the issue's keys and method names."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/reproduce.py", "--prompts", "2", "--models", "demo-linear", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)["rows"]
    assert [r["method"] for r in rows] == ["none", "prompted", "exact"]
    keys = {"model", "method", "accuracy", "kl", "max_abs_logit_diff", "patch_bytes", "prompt_kv_bytes"}
    assert all(set(r) == keys for r in rows)
    exact = rows[2]
    assert exact["max_abs_logit_diff"] <= 1e-4 and exact["kl"] <= 1e-6
    assert exact["accuracy"] == rows[1]["accuracy"]
