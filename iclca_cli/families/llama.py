"""Llama (and SmolLM2): rotary positions, grouped-query attention."""

from .base import Family

FAMILY = Family(model_type="llama", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("LlamaConfig", "LlamaForCausalLM"), peft=True)
