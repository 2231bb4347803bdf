"""Kimi-Linear: KDA linear-attention layers (convolution and recurrent states) and MLA attention layers, whose cache
holds a compressed latent; NoPE."""

from .base import SPECIAL_TOKENS, Family

# moonshotai/Kimi-Linear-48B-A3B-Instruct (kda_layers / full_attn_layers, 1-indexed): its first eight layers, three
# KDA layers before each MLA layer; layer 1's MLP dense (first_k_dense_replace 1), the others mixtures of experts
TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
            qk_nope_head_dim=8, num_local_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            linear_attn_config=dict(kda_layers=[1, 2, 3, 5, 6, 7], full_attn_layers=[4, 8], num_heads=4, head_dim=8,
                                    short_conv_kernel_size=4), **SPECIAL_TOKENS)

FAMILY = Family(model_type="kimi_linear", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("KimiLinearConfig", "KimiLinearForCausalLM"), tiny=TINY, noise=1e-6)
