"""Falcon-H1: every layer runs a Mamba2 mixer and rotary attention side by side (layer kind `hybrid`)."""

from .base import SPECIAL_TOKENS, Family

# tiiuae/Falcon-H1-0.5B-Instruct: every layer attention and Mamba2 side by side, with its own MLP
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=4, mamba_d_state=8,
            mamba_d_conv=4, mamba_expand=2, **SPECIAL_TOKENS)

FAMILY = Family(model_type="falcon_h1", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("FalconH1Config", "FalconH1ForCausalLM"), tiny=TINY)
