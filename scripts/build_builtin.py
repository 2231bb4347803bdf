"""Write the built-in `demo-linear` checkpoint into the package (iclca_cli/builtin/demo-linear/).

    python scripts/build_builtin.py            # rebuilds it; same inputs -> same fingerprint

The model config comes from configs/models/demo-linear.json, the tokenizer's vocabulary from
configs/tasks/recall.json. Weights are the seeded random initialisation: the checkpoint shows
that patches are exact, not that the model has learned anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_demo_linear():
    """(model, tokenizer) of the built-in demo-linear, from the configs and the seed."""
    import torch

    from iclca_cli.models import IclcaLinearConfig, IclcaLinearForCausalLM
    from iclca_cli.word_tokenizer import build_word_tokenizer

    spec = json.loads((ROOT / "configs/models/demo-linear.json").read_text())
    task = json.loads((ROOT / "configs/tasks/recall.json").read_text())
    tokenizer = build_word_tokenizer(task["keys"] + task["values"])
    seed = spec.pop("seed")
    spec.pop("model_type")
    config = IclcaLinearConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(seed)
    model = IclcaLinearForCausalLM(config).eval()
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "iclca_cli/builtin/demo-linear"))
    args = ap.parse_args()
    from iclca_cli.fingerprint import model_fingerprint

    model, tokenizer = build_demo_linear()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} (fingerprint {model_fingerprint(model)[:16]})")


if __name__ == "__main__":
    main()
