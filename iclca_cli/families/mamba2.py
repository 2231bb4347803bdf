"""Mamba2: state-space layers only (a short convolution state and a float32 SSM state per layer); no positions."""

from .base import Family

FAMILY = Family(model_type="mamba2", layers="backbone.layers.{i}", positions="cache",
                merged=("Mamba2Config", "Mamba2ForCausalLM"))
