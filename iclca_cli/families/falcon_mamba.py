"""FalconMamba: Mamba (1) layers with normalised B, C and time steps; fed one token at a time when they continue
from a cache, as Mamba's."""

from .base import Family

FAMILY = Family(model_type="falcon_mamba", layers="backbone.layers.{i}", positions="cache",
                merged=("FalconMambaConfig", "FalconMambaForCausalLM"), step_modules="MambaMixer")
