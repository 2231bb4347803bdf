"""Every state-space / linear-attention / hybrid family x what iclca does with it, measured on the tests' tiny random
models (each family's published layout at tiny widths: Family.tiny), float64, a 30-token prompt and a 6-token query.

    python scripts/recurrent_table.py

Columns: exact: max |Δlogit| of the patched model on the query against the model on prompt + query (next to the
model on the query alone: what dropping the prompt costs); generate: 16 greedy tokens of the patched model equal
generate() on prompt + query; merged: the merged folder, loaded in a fresh process where iclca cannot be imported,
generates the same 16 tokens; stacking: the patch of prompt B on top of the patch of prompt A against the patch of
A + B (max difference over the patch tensors, relative to each tensor's largest value); compressed: a hybrid's
attention layers summarised into R = 8 entries per key/value head (its recurrent layers exact), KL(prompted ||
patched) per query position next to KL(prompted || query alone); "—" where the family has no attention layers to
summarise (or, Zamba2, shares one attention block between layers).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from common import markdown_table, tiny_recurrent

from iclca_cli.methods import applicable
from iclca_cli.methods.compressed import Compressed
from iclca_cli.convert import convert_prompt
from iclca_cli.evaluate import kl_divergence
from iclca_cli.families import all_families, family_of
from iclca_cli.merge import merge_patch
from iclca_cli.patch import patched_copy
from iclca_demo.word_tokenizer import build_word_tokenizer

P, Q, NEW = 30, 6, 16
FRESH = r"""
import importlib.abc, json, sys, torch
class NoIclca(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "iclca_cli":
            raise ImportError("iclca_cli is blocked in this process")
sys.meta_path.insert(0, NoIclca())
from transformers import AutoModelForCausalLM
out = {}
for name, (folder, query, new) in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64,
                                                 experts_implementation="eager")
    with torch.no_grad():
        out[name] = model.generate(torch.tensor([query]), max_new_tokens=new, do_sample=False)[0, len(query):].tolist()
print(json.dumps(out))
"""


def greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - t).abs().max() / t.abs().max().clamp_min(1e-30)) for n, t in b.items())


@torch.no_grad()
def main() -> None:
    families = [name for name, family in all_families().items() if family.tiny is not None]
    rows, fresh, expected = {}, {}, {}
    tokenizer = build_word_tokenizer(["a"])
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            model = tiny_recurrent(family, seed=1)
            g = torch.Generator().manual_seed(2)
            prompt = torch.randint(3, 61, (P,), generator=g).tolist()
            query = torch.randint(3, 61, (Q,), generator=g).tolist()
            patch = convert_prompt(model, prompt, "-")
            patched = patched_copy(model, patch)
            want = model(input_ids=torch.tensor([prompt + query])).logits[0, P:]
            exact = float((patched(input_ids=torch.tensor([query])).logits[0] - want).abs().max())
            alone = float((model(input_ids=torch.tensor([query])).logits[0] - want).abs().max())
            expected[family] = greedy(model, prompt + query)
            a = convert_prompt(model, prompt[:12], "-")
            stacked = convert_prompt(copy.deepcopy(model), prompt[12:], "-", base_patch=a)  # --base-patch
            compressed = "—"
            if Compressed in applicable(family_of(model), model.config):
                summary = patched_copy(model, convert_prompt(model, prompt, "-", Compressed(budget=8)))
                got = summary(input_ids=torch.tensor([query])).logits[0]
                alone_logits = model(input_ids=torch.tensor([query])).logits[0]
                compressed = (f"KL {float(kl_divergence(want, got).mean()):.2g} "
                              f"(query alone: {float(kl_divergence(want, alone_logits).mean()):.2g})")
            folder = merge_patch(model, tokenizer, patch, Path(tmp) / f"{family}-merged")  # a folder named xlstm in
            # the working directory would shadow the optional xlstm package transformers looks for
            fresh[family] = (str(folder), query, NEW)
            rows[family] = [f"{exact:.2g} (query alone: {alone:.2g})", greedy(patched, query) == expected[family],
                            relative_difference(stacked.tensors, patch.tensors), compressed]
        proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(fresh)], capture_output=True, text=True, cwd=tmp)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; float64, prompt {P} tokens, "
          f"query {Q} tokens, {NEW} greedy tokens\n")
    print(markdown_table(["family", "exact: max |Δlogit|", "generate", "merged (fresh process)", "stacking",
                          "compressed (R = 8)"],
                         [[f, r[0], yes(r[1]), yes(merged[f] == expected[f]), f"{r[2]:.1g}", r[3]]
                          for f, r in rows.items()]))


if __name__ == "__main__":
    main()
