"""RWKV (v4): time-mixing and channel-mixing layers whose state is a list of five (batch, hidden, layers) tensors
passed as `state=` (three kept in float32). It rescales its weights in place on its first forward in eval mode, so
a patched copy does not share them, and a merged checkpoint gets them back as trained (its own _rescale_layers in
train mode undoes the rescaling)."""

from .base import SPECIAL_TOKENS, Family

# RWKV/rwkv-4-169m-pile: every layer a time-mixing block; weights rescaled every 6 layers there, every layer here
TINY = dict(hidden_size=32, attention_hidden_size=32, intermediate_size=64, num_hidden_layers=2, context_length=64,
            rescale_every=1, **SPECIAL_TOKENS)

FAMILY = Family(model_type="rwkv", layers="rwkv.blocks.{i}", positions="cache", state="cache", layer_kind="linear_attention",
                merged=("RwkvConfig", "RwkvForCausalLM"), cache_kwarg="state", shares_weights=False,
                restore_weights="_rescale_layers", tiny=TINY, noise=1e-6)
