"""Mamba2: state-space layers only (a short convolution state and a float32 SSM state per layer); no positions."""

from .base import SPECIAL_TOKENS, Family

# mistralai/Mamba-Codestral-7B-v0.1: every layer a Mamba2 mixer, grouped B and C (n_groups), gated RMSNorm
TINY = dict(hidden_size=32, num_heads=4, head_dim=16, expand=2, n_groups=2, state_size=8, num_hidden_layers=2,
            conv_kernel=4, chunk_size=4, time_step_rank=4, use_conv_bias=True, use_bias=False, **SPECIAL_TOKENS)

FAMILY = Family(model_type="mamba2", layers="backbone.layers.{i}", positions="cache", state="cache",
                merged=("Mamba2Config", "Mamba2ForCausalLM"), tiny=TINY, noise=1e-6)
