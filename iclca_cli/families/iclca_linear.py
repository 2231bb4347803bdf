"""iclca's own linear-attention LM: memories S, z per layer (the cache's recurrent states 0 and 1), which a patch
sets as the model's bias buffers; positions from config.position_offset and a learned table (or none)."""

from .base import Family

FAMILY = Family(model_type="iclca_linear", layers="transformer.h.{i}.attn", positions="config", state="buffers",
                position_table="transformer.wpe", modeling="modeling_iclca_linear",
                state_names=("memory_kv", "memory_k"))
