"""Exactness of the cache-keeping families (state-space, linear-attention, hybrid): the tiny random models of the
tests (configs/tiny/recurrent.json), float64, a 30-token prompt and a 6-token query.

    python scripts/recurrent_exactness.py

Per family: max |Δlogit| of the patched model on the query against the model on prompt + query, and of the model
on the query alone (what dropping the prompt costs, so that the first means something).
"""

from __future__ import annotations

import json

import torch
from common import ROOT, markdown_table, patched_by, tiny_recurrent

P, Q = 30, 6


@torch.no_grad()
def main() -> None:
    rows = []
    for family in json.loads((ROOT / "configs/tiny/recurrent.json").read_text()):
        model = tiny_recurrent(family, seed=1)
        g = torch.Generator().manual_seed(2)
        prompt, query = torch.randint(3, 61, (P,), generator=g).tolist(), torch.randint(3, 61, (Q,), generator=g).tolist()
        want = model(input_ids=torch.tensor([prompt + query])).logits[0, P:]
        patched, _ = patched_by(model, prompt, "exact")
        got = patched(input_ids=torch.tensor([query])).logits[0]
        alone = model(input_ids=torch.tensor([query])).logits[0]
        rows.append([family, f"{float((got - want).abs().max()):.2g}", f"{float((alone - want).abs().max()):.2g}"])
    print(f"float64, prompt {P} tokens, query {Q} tokens; max |Δlogit| against the model on prompt + query\n")
    print(markdown_table(["family", "patched", "query alone"], rows))


if __name__ == "__main__":
    main()
