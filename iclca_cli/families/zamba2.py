"""Zamba2: Mamba2 layers, and hybrid layers that add a shared attention block (layer kind `hybrid`)."""

from .base import SPECIAL_TOKENS, Family

# Zyphra/Zamba2-2.7B (transformers' default layers_block_type): its first 13 layers, a hybrid layer (a shared
# attention block, then Mamba2) after six and after five more Mamba2 layers; two shared blocks taken in turn
# (num_mem_blocks 2), rotary positions in the shared attention (use_mem_rope)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=13, num_attention_heads=4, num_key_value_heads=4,
            n_mamba_heads=4, mamba_ngroups=1, chunk_size=4, num_mem_blocks=2, use_mem_rope=True, adapter_rank=4,
            layers_block_type=["mamba"] * 6 + ["hybrid"] + ["mamba"] * 5 + ["hybrid"], mamba_d_state=8, mamba_d_conv=4,
            mamba_expand=2, **SPECIAL_TOKENS)

FAMILY = Family(model_type="zamba2", layers="model.layers.{i}", positions="cache", state="cache",
                merged=("Zamba2Config", "Zamba2ForCausalLM"), tiny=TINY, noise=1e-6)
