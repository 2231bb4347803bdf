"""Zamba2: Mamba2 layers, and hybrid layers that add a shared attention block (layer kind `hybrid`)."""

from .base import Family

FAMILY = Family(model_type="zamba2", layers="model.layers.{i}", positions="cache",
                merged=("Zamba2Config", "Zamba2ForCausalLM"))
