"""Qwen3-Next: gated DeltaNet layers (a convolution state and a delta-rule state, computed in float32) and
partial-rotary attention layers; mixture-of-experts MLPs."""

from .base import Family

FAMILY = Family(model_type="qwen3_next", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("Qwen3NextConfig", "Qwen3NextForCausalLM"))
