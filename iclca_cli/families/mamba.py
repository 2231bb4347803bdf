"""Mamba (1): state-space layers (a convolution state and a float32 SSM state); no positions. Its mixers' full-
sequence scan takes no initial state, so iclca feeds them one token at a time when they continue from a cache."""

from .base import SPECIAL_TOKENS, Family

# state-spaces/mamba-130m-hf: every layer a Mamba mixer (use_conv_bias, no projection bias, residual in float32)
TINY = dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4,
            use_conv_bias=True, use_bias=False, residual_in_fp32=True, **SPECIAL_TOKENS)

FAMILY = Family(model_type="mamba", layers="backbone.layers.{i}", positions="cache", state="cache",
                merged=("MambaConfig", "MambaForCausalLM"), step_modules="MambaMixer", tiny=TINY, noise=1e-6)
