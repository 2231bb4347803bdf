"""Granite 4 (granitemoehybrid): Mamba2 layers and attention layers (NoPE by default), mixture-of-experts MLPs."""

from .base import SPECIAL_TOKENS, Family

# ibm-granite/granite-4.0-h-small: five Mamba2 layers before each attention layer, no positions in attention
# (position_embedding_type "nope"), mixture-of-experts MLPs beside a shared one
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, mamba_n_heads=4, mamba_d_head=16,
            mamba_n_groups=1, mamba_chunk_size=4, layer_types=["mamba"] * 5 + ["attention", "mamba"],
            position_embedding_type="nope", mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, **SPECIAL_TOKENS)

FAMILY = Family(model_type="granitemoehybrid", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"), tiny=TINY)
