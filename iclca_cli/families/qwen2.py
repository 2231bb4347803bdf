"""Qwen2: rotary positions, grouped-query attention, q/k/v biases, sliding-window layers where
config.layer_types says so."""

from .base import Family

FAMILY = Family(model_type="qwen2", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("Qwen2Config", "Qwen2ForCausalLM"), peft=True)
