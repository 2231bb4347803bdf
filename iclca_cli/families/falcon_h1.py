"""Falcon-H1: every layer runs a Mamba2 mixer and rotary attention side by side (layer kind `hybrid`)."""

from .base import Family

FAMILY = Family(model_type="falcon_h1", layers="model.layers.{i}", positions="cache",
                attention="self_attn", merged=("FalconH1Config", "FalconH1ForCausalLM"))
