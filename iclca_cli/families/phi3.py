"""Phi-3: rotary positions (partial rotary factor), one fused qkv projection; captured after the split, so the
fusion does not matter."""

from .base import Family

FAMILY = Family(model_type="phi3", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("Phi3Config", "Phi3ForCausalLM"), peft=True)
