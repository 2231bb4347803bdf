"""Qwen3: rotary positions, grouped-query attention, RMS-normalised queries and keys (captured after the norm)."""

from .base import Family

FAMILY = Family(model_type="qwen3", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("Qwen3Config", "Qwen3ForCausalLM"), peft=True)
