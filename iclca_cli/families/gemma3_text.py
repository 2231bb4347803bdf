"""Gemma 3 (text): sliding-window and full layers (config.layer_types) with their own rotary bases, normalised
queries and keys, query_pre_attn_scalar scaling."""

from .base import Family

FAMILY = Family(model_type="gemma3_text", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("Gemma3TextConfig", "Gemma3ForCausalLM"), peft=True)
