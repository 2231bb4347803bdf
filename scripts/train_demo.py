"""Train the built-in demo models on the in-context recall task, on CPU, deterministically.

    python scripts/train_demo.py [--model linear|gpt2|mamba2|lfm2|all] [--steps N] [--out-root DIR]

Each model reads sequences "k1: v1\\n ... kn: vn\\n" followed by query lines "kq: vq\\n" about the
prompt's keys, with a fresh random mapping per sequence (configs/tasks/recall.json), and is
trained only on the query lines' values, so it must learn to look values up in its context.
Recipes (width, schedule, steps) are in configs/models/demo-*.json. Writes the checkpoint,
tokenizer and training.json (recipe, training curve, seconds, sha256 of the weights) into
iclca_cli/builtin/demo-<model>/ unless --out-root says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from common import ROOT

from iclca_demo.tasks import RecallTask
from iclca_demo.word_tokenizer import build_word_tokenizer

TASK = ROOT / "configs/tasks/recall.json"


def recipe(name: str) -> dict:
    return json.loads((ROOT / f"configs/models/demo-{name}.json").read_text())


class RecallBatches:
    """Token-id batches of the recall task, sampled with torch ops from a seeded generator."""

    def __init__(self, task: RecallTask, tokenizer):
        vocab = tokenizer.get_vocab()
        self.key_ids = torch.tensor([vocab[k + ":"] for k in task.keys])  # "apple:"
        self.value_ids = torch.tensor([vocab["Ġ" + v] for v in task.values])  # " 7"
        self.newline = vocab["Ċ"]

    def lines(self, keys, values):
        """(B, n) key and value indices -> (B, 3n) ids of "key: value" lines, newline-ended."""
        B, n = keys.shape
        newline = torch.full((B, n), self.newline)
        return torch.stack([self.key_ids[keys], self.value_ids[values], newline], dim=-1).view(B, 3 * n)

    def sample(self, g: torch.Generator, batch: int, pairs: int, queries: int):
        """(input ids (B, T), labels (B, T)): labels hold the query lines' values, -100 elsewhere."""
        K, V = len(self.key_ids), len(self.value_ids)
        keys = torch.rand(batch, K, generator=g).argsort(dim=-1)[:, :pairs]  # (B, n) distinct keys
        values = torch.randint(0, V, (batch, pairs), generator=g)  # (B, n)
        asked = torch.randint(0, pairs, (batch, queries), generator=g)  # (B, Q) which pair each query asks
        prompt = self.lines(keys, values)  # (B, 3n)
        query = self.lines(keys.gather(1, asked), values.gather(1, asked))  # (B, 3Q)
        x = torch.cat([prompt, query], dim=1)  # (B, T)
        labels = torch.full_like(x, -100)
        value_pos = 3 * pairs + 3 * torch.arange(queries) + 1  # the value token of each query line
        labels[:, value_pos] = x[:, value_pos]
        return x, labels

    def repeats(self, g: torch.Generator, batch: int, length: int):
        """A copying batch: `length` random task tokens, then the same again; labels on the copy.

        The copy is only predictable by finding the previous occurrence of the current token and
        reading what followed it: the look-up (induction) circuit that recall needs, with a label on
        every copied token. The length varies per batch so that a fixed positional offset cannot do it.
        """
        vocab = torch.cat([self.key_ids, self.value_ids])
        r = vocab[torch.randint(0, len(vocab), (batch, length), generator=g)]  # (B, L)
        x = torch.cat([r, r], dim=1)  # (B, 2L)
        labels = x.clone()
        labels[:, : length + 1] = -100  # the first copied token is not predictable yet
        return x, labels


def build_model(name: str, spec: dict, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM

    torch.manual_seed(spec["seed"])
    if "classes" in spec:  # a stock transformers architecture: (config class, model class)
        import transformers

        config_class, model_class = (getattr(transformers, c) for c in spec["classes"])
        config = config_class(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id, **spec["model"])
        return model_class(config)
    if name == "linear":
        config = IclcaLinearConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **spec["model"])
        return IclcaLinearForCausalLM(config)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **spec["model"])
    return GPT2LMHeadModel(config)


@torch.no_grad()
def in_context_accuracy(model, x, labels) -> float:
    logits = model(input_ids=x).logits[:, :-1]  # (B, T-1, V) predicting tokens 1..T-1
    target = labels[:, 1:]
    mask = target != -100
    return float((logits.argmax(-1)[mask] == target[mask]).float().mean())


def environment() -> dict:
    """What the weights' last bits depend on: the same recipe gives the same bytes only where these agree (CPU
    kernels differ between instruction sets)."""
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def train(name: str, out_root: Path, steps: int | None = None, log=print) -> dict:
    spec = recipe(name)
    t = spec["train"]
    steps = t["steps"] if steps is None else steps
    task = RecallTask.from_json(TASK)
    tokenizer = build_word_tokenizer(task.words)
    data = RecallBatches(task, tokenizer)
    model = build_model(name, spec, tokenizer).train()
    torch.set_num_threads(t.get("threads", 2))
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    eval_x, eval_labels = data.sample(torch.Generator().manual_seed(10_000 + spec["seed"]), 256, t["pairs"], t["queries"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"], betas=tuple(t.get("betas", (0.9, 0.999))))

    def lr_at(step):  # linear warm-up, then constant or cosine to 10%
        if step < t["warmup"]:
            return (step + 1) / t["warmup"]
        if t.get("schedule", "cosine") == "constant":
            return 1.0
        progress = (step - t["warmup"]) / max(1, steps - t["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        pairs = int(torch.randint(t["min_pairs"], t["pairs"] + 1, (1,), generator=g))  # a curriculum by mixture
        x, labels = data.sample(g, t["batch"], pairs, t["queries"])
        copying = bool(t.get("copy_every")) and step % t["copy_every"] == 0
        if copying:  # an auxiliary copying batch grows the look-up circuit within hundreds of steps
            lo, hi = t["copy_length"]
            x, labels = data.repeats(g, t["batch"], int(torch.randint(lo, hi + 1, (1,), generator=g)))
        loss = model(input_ids=x, labels=labels).loss
        if not copying:
            recall_loss = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % t["eval_every"] == 0 or step == steps:
            model.eval()
            acc = in_context_accuracy(model, eval_x, eval_labels)
            model.train()
            curve.append({"step": step, "recall_loss": round(recall_loss, 4), "in_context_accuracy": round(acc, 4)})
            log(f"demo-{name} step {step:5d}  recall loss {recall_loss:.4f}  in-context accuracy {acc:.3f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = round(time.perf_counter() - t0, 1)
    model.eval()
    final = in_context_accuracy(model, eval_x, eval_labels)
    out = out_root / f"demo-{name}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    record = {"model": f"demo-{name}", "recipe": spec, "steps": steps, "seconds": seconds,
              "environment": environment(), "final_in_context_accuracy": round(final, 4), "curve": curve,
              "model_safetensors_sha256": weights}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(p.stem.removeprefix("demo-") for p in (ROOT / "configs/models").glob("demo-*.json"))
    ap.add_argument("--model", choices=[*names, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps (0: untrained)")
    ap.add_argument("--out-root", type=Path, default=ROOT / "iclca_cli/builtin")
    args = ap.parse_args()
    for name in (names if args.model == "all" else [args.model]):
        record = train(name, args.out_root, args.steps)
        print(f"demo-{name}: {record['steps']} steps in {record['seconds']} s, final in-context accuracy "
              f"{record['final_in_context_accuracy']}")


if __name__ == "__main__":
    main()
