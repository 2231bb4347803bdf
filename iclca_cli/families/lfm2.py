"""LFM2: short-convolution layers (their state is the last inputs) and rotary attention layers."""

from .base import SPECIAL_TOKENS, Family

# LiquidAI/LFM2-350M (full_attn_idxs [2, 5, 8, 10, 12, 14] of 16): its first six layers, two short convolutions
# before each attention layer; conv_L_cache 3, no conv bias
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            conv_L_cache=3, conv_bias=False, block_auto_adjust_ff_dim=False, full_attn_idxs=[2, 5], **SPECIAL_TOKENS)

FAMILY = Family(model_type="lfm2", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("Lfm2Config", "Lfm2ForCausalLM"), tiny=TINY)
