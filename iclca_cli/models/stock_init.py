"""The base of the mixins that merged classes add to stock transformers classes (models/patched_decoder.py,
models/patched_cache.py)."""

from __future__ import annotations


class StockInit:
    @classmethod
    def is_custom_code(cls) -> bool:
        """False: the stock class's _init_weights initialises this one. transformers would otherwise take it for
        remote code that initialises nothing itself, and skip modules whose own weights were loaded, leaving their
        non-persistent buffers empty (Falcon-H1's mup_vector: NaN logits)."""
        return False
