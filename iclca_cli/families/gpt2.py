"""GPT-2: a learned position table (shifted by P rows in a patched model), fused q/k/v projection."""

from .base import Family

FAMILY = Family(model_type="gpt2", layers="transformer.h.{i}.attn", positions="learned", position_table="transformer.wpe",
                merged=("GPT2Config", "GPT2LMHeadModel"), peft=True)
