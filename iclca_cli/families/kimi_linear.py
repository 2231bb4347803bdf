"""Kimi-Linear: KDA linear-attention layers (convolution and recurrent states) and MLA attention layers, whose cache
holds a compressed latent; NoPE."""

from .base import Family

FAMILY = Family(model_type="kimi_linear", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("KimiLinearConfig", "KimiLinearForCausalLM"))
