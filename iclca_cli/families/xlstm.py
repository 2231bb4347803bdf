"""xLSTM: mLSTM layers, each keeping (C, n, m) in the model's own xLSTMCache (not a transformers Cache)."""

from .base import Family

FAMILY = Family(model_type="xlstm", layers="backbone.blocks.{i}", positions="cache", layer_kind="linear_attention",
                merged=("xLSTMConfig", "xLSTMForCausalLM"), cache_class="xLSTMCache")
