"""LFM2: short-convolution layers (their state is the last inputs) and rotary attention layers."""

from .base import Family

FAMILY = Family(model_type="lfm2", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("Lfm2Config", "Lfm2ForCausalLM"))
