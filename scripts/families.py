"""The tables of model families, from the registries (iclca_cli/families/, iclca_cli/methods/): what each family
file declares (docs/families.md), and which methods each family takes (the README).

    python scripts/families.py             # the family table
    python scripts/families.py --methods   # family x method
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


def family_config(family):
    """A config of the family's layout: its published tiny layout where it declares one, else the stock default."""
    import transformers

    from iclca_cli.models import IclcaLinearConfig

    if family.merged is None:
        return IclcaLinearConfig()
    cls = getattr(transformers, family.merged[0])
    return cls(**family.tiny) if family.tiny else cls()


def methods_table() -> str:
    """Family x method: ✓ where `methods.applicable` lists the method (the first one is the default, in bold);
    refused where the conversion refuses it (Taylor memories cannot express Gemma 2's soft-capped scores)."""
    from iclca_cli.methods import all_methods, applicable

    names = list(all_methods())
    rows = []
    for name, family in all_families().items():
        config = family_config(family)
        takes = [m.name for m in applicable(family, config)]
        cells = []
        for method in names:
            if method not in takes:
                cells.append("—")
            elif method == "taylor" and getattr(config, "attn_logit_softcapping", None):
                cells.append("refused")
            else:
                cells.append("**default**" if method == takes[0] else "✓")
        rows.append([f"`{name}`", *cells])
    return markdown_table(["family", *names], rows)


if __name__ == "__main__":
    import sys

    print(methods_table() if "--methods" in sys.argv[1:] else table())
