"""RWKV (v4): time-mixing and channel-mixing layers whose state is a list of five (batch, hidden, layers) tensors
passed as `state=` (three kept in float32). It rescales its weights in place on its first forward in eval mode, so
a patched copy does not share them, and a merged checkpoint gets them back as trained (its own _rescale_layers in
train mode undoes the rescaling)."""

from .base import Family

FAMILY = Family(model_type="rwkv", layers="rwkv.blocks.{i}", positions="cache", layer_kind="linear_attention",
                merged=("RwkvConfig", "RwkvForCausalLM"), cache_kwarg="state", shares_weights=False,
                restore_weights="_rescale_layers")
