"""Qwen3-Next: gated DeltaNet layers (a convolution state and a delta-rule state, computed in float32) and
partial-rotary attention layers; mixture-of-experts MLPs."""

from .base import SPECIAL_TOKENS, Family

# Qwen/Qwen3-Next-80B-A3B-Instruct (full_attention_interval 4): three gated DeltaNet layers, then gated attention
# with partial rotary (0.25); a mixture-of-experts MLP with a shared expert in every layer (decoder_sparse_step 1)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, partial_rotary_factor=0.25, full_attention_interval=4, decoder_sparse_step=1, mlp_only_layers=[],
            linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, **SPECIAL_TOKENS)

FAMILY = Family(model_type="qwen3_next", layers="model.layers.{i}", positions="cache", state="cache",
                attention="self_attn", merged=("Qwen3NextConfig", "Qwen3NextForCausalLM"), tiny=TINY, noise=1e-6)
