"""xLSTM: mLSTM layers, each keeping (C, n, m) in the model's own xLSTMCache (not a transformers Cache)."""

from .base import SPECIAL_TOKENS, Family

# NX-AI/xLSTM-7b: every layer an mLSTM block
TINY = dict(hidden_size=64, qk_dim_factor=1.0, v_dim_factor=1.0, num_heads=2, num_hidden_layers=2, chunk_size=4,
            ffn_round_up_to_multiple_of=16, autocast_kernel_dtype="float32", inference_state_dtype="float32",
            **SPECIAL_TOKENS)

FAMILY = Family(model_type="xlstm", layers="backbone.blocks.{i}", positions="cache", state="cache", layer_kind="linear_attention",
                merged=("xLSTMConfig", "xLSTMForCausalLM"), cache_class="xLSTMCache", tiny=TINY, noise=1e-6)
