"""Bamba: Mamba2 layers and partial-rotary attention layers. Its model numbers a call's tokens from 0 whatever the
cache holds, so iclca passes position ids counted from the cache."""

from .base import Family

FAMILY = Family(model_type="bamba", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("BambaConfig", "BambaForCausalLM"), count_positions=True)
