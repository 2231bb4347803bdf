"""Nemotron-H: Mamba2 layers, attention layers, and MLP / mixture-of-experts layers that keep no state."""

from .base import SPECIAL_TOKENS, Family

# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B (hybrid_override_pattern "MEMEM*EMEMEM*E..."): its first seven layers,
# Mamba2 (M) and mixture-of-experts (E) layers in turn, attention (*) after the third Mamba2 layer
TINY = dict(hidden_size=32, hybrid_override_pattern="MEMEM*E", num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=64, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=4,
            n_routed_experts=4, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, num_experts_per_tok=2,
            **SPECIAL_TOKENS)

FAMILY = Family(model_type="nemotron_h", layers="model.layers.{i}", positions="cache", state="cache",
                attention="mixer", merged=("NemotronHConfig", "NemotronHForCausalLM"), tiny=TINY)
