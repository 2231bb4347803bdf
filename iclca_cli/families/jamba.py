"""Jamba: Mamba (1) layers (fed one token at a time when they continue from a cache, as Mamba's), attention layers
without positions, mixture-of-experts MLPs."""

from .base import Family

FAMILY = Family(model_type="jamba", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("JambaConfig", "JambaForCausalLM"), step_modules="MambaMixer")
