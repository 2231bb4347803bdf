"""In-context tasks defined in configs/tasks/*.json: every prompt draws a fresh random mapping, so
the answer to a query can only come from the prompt.

recall: lines "{key}: {value}\\n" for distinct random keys, values drawn at random; a query is
"{key}:" for a key of the prompt, its target " {value}".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from iclca_cli.inputs import Query


@dataclass(frozen=True)
class RecallTask:
    name: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    pairs_per_prompt: int
    line: str = "{key}: {value}\n"
    query: str = "{key}:"
    target: str = " {value}"

    @classmethod
    def from_json(cls, path: str | Path) -> RecallTask:
        spec = json.loads(Path(path).read_text())
        return cls(name=spec["name"], keys=tuple(spec["keys"]), values=tuple(spec["values"]),
                   pairs_per_prompt=spec["pairs_per_prompt"], line=spec["line"], query=spec["query"],
                   target=spec["target"])

    @property
    def words(self) -> list[str]:
        return [*self.keys, *self.values]

    def sample(self, rng: random.Random, pairs: int | None = None, queries: int | None = None) -> tuple[str, list[Query]]:
        """(prompt text, queries with targets); queries ask about keys of the prompt, in random order."""
        n = self.pairs_per_prompt if pairs is None else pairs
        keys = rng.sample(self.keys, n)
        mapping = {k: rng.choice(self.values) for k in keys}
        prompt = "".join(self.line.format(key=k, value=v) for k, v in mapping.items())
        asked = rng.sample(keys, n) if queries is None else [rng.choice(keys) for _ in range(queries)]
        return prompt, [Query(self.query.format(key=k), self.target.format(value=mapping[k])) for k in asked]
