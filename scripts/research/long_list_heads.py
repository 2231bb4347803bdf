"""Where a long list's look-ups live in SmolLM2-135M-Instruct, and what `compressed` does to them: a diagnosis on the
development task long_numbers (`<word>: <two-digit number>`, 100 facts), one prompt. None of it is part of iclca.

    python scripts/research/long_list_heads.py [--budget 32] [--prompt 1]

1. Each layer summarised alone (its heads at the budgets the default split gives them at R), every other layer
   exact: the answers that survive, and the KL.
2. In the layer that loses most, each key/value head summarised alone at r = 32, 128, 256 entries, fitted
   (`compressed`) or evicted (the most attended prompt entries kept as they are).
3. That head kept as an oracle would: the first token and the prompt's number tokens (the answers), as they are
   or with fitted values; then with that head exact or the oracle, and every other head summarised at R; and where
   the ranking by received attention (`--keys attention`) places the number tokens.
Scored as in scripts/real_model.py (whole answers, KL at the answer positions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import random

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: common, real_model
from common import markdown_table, number
from few_shot_tasks import few_shot
from real_model import DEFAULT_FOLDER, prompted_answers, scored, smollm2_folder

from iclca_cli import summaries
from iclca_cli.loading import load_model
from iclca_cli.ops import compress


class Study:
    """One prompt's captured heads, the default split's summaries at R, and a scorer for any mix of them."""

    def __init__(self, model, tokenizer, task: str, prompt: int, budget: int):
        self.model = model
        rng = random.Random(f"dev-{task}")  # real_model.py's development prompts: the prompt-th of them
        drawn = [few_shot(task, rng) for _ in range(prompt)][-1]
        self.prompt, self.queries, self.wants = prompted_answers(model, tokenizer, *drawn)
        self.P = len(self.prompt)
        self.heads = summaries.prompt_heads(model, self.prompt)
        self.Hkv = self.heads.kv_heads
        self.budgets, fits = summaries.head_budgets(self.heads, budget)
        self.default = {b: fits[r][b] for b, r in enumerate(self.budgets)}  # head row -> its Summary at R
        self.numbers = [i for i, t in enumerate(self.prompt) if tokenizer.decode([t]).strip().isdigit()]

    def exact(self, b: int) -> compress.Summary:
        """Head row b as the prefix: every prompt entry, bias 0 (a summary of P entries)."""
        return self.summary(b, self.P, "compressed")

    def summary(self, b: int, r: int, how: str) -> compress.Summary:
        k, v, ref, scaling = self.heads.rows([b])
        if how == "evict":
            s = compress.evict(k, v, ref, r, scaling, self.heads.softcap)
            return compress.Summary(s.keys, s.values, k.new_zeros(1, r), s.error)
        return compress.summarise(k, v, ref, [r], scaling, self.heads.softcap)[r]

    def oracle(self, b: int, fitted: bool) -> compress.Summary:
        """The first token and the number tokens of head row b, as they are or with fitted bias and values."""
        k, v, ref, scaling = self.heads.rows([b])
        index = torch.tensor([0, *self.numbers])
        if fitted:
            return compress.fit(ref, k[:, index], scaling, self.heads.softcap)
        return compress.Summary(k[:, index], v[:, index], k.new_zeros(1, len(index)), k.new_zeros(1))

    def score(self, chosen) -> tuple[int, float]:
        """(answers right, mean KL) with chosen(head row) -> its Summary in every layer."""
        patched = summaries.patched_with(self.model, self.heads, [chosen(b) for b in range(len(self.heads.keys))], self.P)
        results = scored(patched, self.queries, self.wants)
        return sum(r for r, _, _ in results), sum(kl for _, kl, _ in results) / len(results)


def row(name: str, result: tuple[int, float], n: int) -> list:
    return [name, f"{result[0]} / {n}", number(result[1])]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1, help="which of real_model.py's development prompts (1: the first)")
    args = ap.parse_args()
    model, tokenizer = load_model(str(smollm2_folder(DEFAULT_FOLDER)), "float32")
    s = Study(model, tokenizer, "long_numbers", args.prompt, args.budget)
    n, Hkv, R = len(s.queries), s.Hkv, args.budget
    prompted = sum(r for r, _, _ in scored(None, s.queries, s.wants))
    print(f"long_numbers, P = {s.P}, R = {R}: the prompted model gets {prompted} of {n} right\n")

    layers = [s.score(lambda b, i=i: s.default[b] if b // Hkv == i else s.exact(b)) for i in range(len(s.heads.names))]
    rows = [row("every layer exact (prefix)", s.score(s.exact), n), row(f"every layer at R = {R}", s.score(s.default.get), n)]
    rows += [row(f"layer {i} alone at R = {R} (heads {s.budgets[i * Hkv:(i + 1) * Hkv]})", r, n) for i, r in enumerate(layers)]
    print(markdown_table(["summarised", "right", "KL(prompted‖x)"], rows), "\n")

    worst = min(range(len(layers)), key=lambda i: (layers[i][0], -layers[i][1]))
    rows, alone = [], {}  # alone: (right, -KL) of each head compressed alone at r = 32
    for h in range(Hkv):
        b = worst * Hkv + h
        for r in (32, 128, 256):
            for how in ("compressed", "evict"):
                one = s.summary(b, r, how)
                result = s.score(lambda x, b=b, one=one: one if x == b else s.exact(x))
                alone.setdefault(b, (result[0], -result[1]))
                rows.append(row(f"layer {worst}, head {h} alone: {how} r = {r}", result, n))
    print(markdown_table(["summarised", "right", "KL(prompted‖x)"], rows), "\n")

    b = min(alone, key=alone.get)  # the look-up head: the one that, compressed alone, loses most
    oracle = {fitted: s.oracle(b, fitted) for fitted in (False, True)}
    name = f"layer {worst} head {b % Hkv}"
    rows = [row(f"{name} alone: first token + {len(s.numbers)} number tokens, as they are", s.score(lambda x: oracle[False] if x == b else s.exact(x)), n),
            row(f"{name} alone: the same keys, fitted bias and values", s.score(lambda x: oracle[True] if x == b else s.exact(x)), n),
            row(f"{name} exact, every other head at R = {R}", s.score(lambda x: s.exact(x) if x == b else s.default[x]), n),
            row(f"{name} the oracle (as they are), every other head at R = {R}", s.score(lambda x: oracle[False] if x == b else s.default[x]), n)]
    print(markdown_table(["summarised", "right", "KL(prompted‖x)"], rows), "\n")

    ref = s.heads.rows([b])[2]
    place = compress.ranking(ref)[0].argsort()  # (P,): each prompt entry's place in the ranking, 0 = first
    numbers = place[s.numbers].float()
    print(f"{name}: the most attention a prompt entry receives from any reference query, median over the prompt "
          f"{ref.received[0].median():.2f}; the number tokens' places in the ranking (of {s.P}): median "
          f"{numbers.median():.0f}, {int((numbers < 128).sum())} of {len(s.numbers)} in the first 128")


if __name__ == "__main__":
    main()
