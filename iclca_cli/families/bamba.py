"""Bamba: Mamba2 layers and partial-rotary attention layers. Its model numbers a call's tokens from 0 whatever the
cache holds, so iclca passes position ids counted from the cache."""

from .base import SPECIAL_TOKENS, Family

# ibm-ai-platform/Bamba-9B (attn_layer_indices [9, 18, 27] of 32): its first 19 layers, nine Mamba2 layers before
# each partial-rotary attention layer
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=19, num_attention_heads=4, num_key_value_heads=2,
            mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=4, attn_layer_indices=[9, 18],
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, **SPECIAL_TOKENS)

FAMILY = Family(model_type="bamba", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("BambaConfig", "BambaForCausalLM"), count_positions=True, tiny=TINY,
                noise=1e-6)
