"""Mamba (1): state-space layers (a convolution state and a float32 SSM state); no positions. Its mixers' full-
sequence scan takes no initial state, so iclca feeds them one token at a time when they continue from a cache."""

from .base import Family

FAMILY = Family(model_type="mamba", layers="backbone.layers.{i}", positions="cache",
                merged=("MambaConfig", "MambaForCausalLM"), step_modules="MambaMixer")
