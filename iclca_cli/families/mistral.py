"""Mistral: rotary positions, grouped-query attention; with config.sliding_window every layer slides (v0.1)."""

from .base import Family

FAMILY = Family(model_type="mistral", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("MistralConfig", "MistralForCausalLM"), peft=True)
