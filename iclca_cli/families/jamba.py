"""Jamba: Mamba (1) layers (fed one token at a time when they continue from a cache, as Mamba's), attention layers
without positions, mixture-of-experts MLPs."""

from .base import SPECIAL_TOKENS, Family

# ai21labs/AI21-Jamba-Mini-1.5 (and Jamba-v0.1): blocks of eight layers, attention at offset 4 of each
# (attn_layer_period 8), mixture-of-experts MLPs in every other layer (expert_layer_period 2, offset 1)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
            num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, **SPECIAL_TOKENS)

FAMILY = Family(model_type="jamba", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("JambaConfig", "JambaForCausalLM"), step_modules="MambaMixer", tiny=TINY, noise=1e-6)
