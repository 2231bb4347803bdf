"""The README's table of model families, from the registry (iclca_cli/families/): what each family file declares.

    python scripts/families.py
"""

from __future__ import annotations

import importlib

from common import markdown_table

from iclca_cli.families import all_families
from iclca_cli.models.merged import auto_classes

POSITIONS = {"rotary": "rotary, offset by P", "learned": "learned table, shifted by P rows",
             "config": "config.position_offset", "cache": "the cache holds the prompt's P tokens", "none": "none"}


def table() -> str:
    rows = []
    for name, family in all_families().items():
        doc = importlib.import_module(f"iclca_cli.families.{name}").__doc__
        merged = auto_classes(family)["AutoModelForCausalLM"].__name__
        rows.append([f"`{name}`", " ".join(doc.split()), POSITIONS[family.positions], f"`{merged}`",
                     "yes" if family.peft else "—"])
    return markdown_table(["family", "what iclca handles", "query positions", "merged class", "export-peft"], rows)


if __name__ == "__main__":
    print(table())
