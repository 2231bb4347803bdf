"""FalconMamba: Mamba (1) layers with normalised B, C and time steps; fed one token at a time when they continue
from a cache, as Mamba's."""

from .base import SPECIAL_TOKENS, Family

# tiiuae/falcon-mamba-7b: every layer a Mamba mixer with RMS-normalised B, C and dt (mixer_rms_eps)
TINY = dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4,
            use_conv_bias=True, use_bias=False, mixer_rms_eps=1e-6, **SPECIAL_TOKENS)

FAMILY = Family(model_type="falcon_mamba", layers="backbone.layers.{i}", positions="cache", state="cache",
                merged=("FalconMambaConfig", "FalconMambaForCausalLM"), step_modules="MambaMixer", tiny=TINY, noise=1e-6)
