"""Granite 4 (granitemoehybrid): Mamba2 layers and attention layers (NoPE by default), mixture-of-experts MLPs."""

from .base import Family

FAMILY = Family(model_type="granitemoehybrid", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"))
