"""Llama with a prompt folded in: prefix (exact), compressed or Taylor patches on every attention
module, applied by iclca's attention function (modeling_iclca_gpt2.patched_attention, which handles
grouped-query attention), and query positions shifted by P through a pre-hook on the rotary embedding.

Travels into merged folders next to modeling_iclca_gpt2.py (imported relatively); needs only torch
and transformers.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, LlamaForCausalLM

from .modeling_iclca_gpt2 import ATTENTION_NAME, empty_patch_buffers  # importing it registers the attention function


def shift_positions(module, args, kwargs):
    """Forward pre-hook on a rotary embedding module: position ids + module.iclca_position_offset."""
    offset = module.iclca_position_offset
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"] + offset
    else:
        args = (args[0], args[1] + offset, *args[2:])
    return args, kwargs


def shift_rotary(rotary: torch.nn.Module, prompt_tokens: int) -> None:
    if not hasattr(rotary, "iclca_position_offset"):
        rotary.register_forward_pre_hook(shift_positions, with_kwargs=True)
    rotary.iclca_position_offset = prompt_tokens


@strict
class IclcaLlamaConfig(LlamaConfig):
    """A Llama config whose model carries a folded-in prompt."""

    model_type = "iclca_llama"

    iclca_method: str = "prefix"  # "prefix", "compressed" or "taylor"
    iclca_prompt_tokens: int = 0  # P: the position shift
    iclca_entries: int = 0  # R: prefix/compressed entries per key/value head
    iclca_feature_dim: int = 0  # F of the Taylor memories (taylor only)


class IclcaLlamaForCausalLM(LlamaForCausalLM):
    config_class = IclcaLlamaConfig

    def __init__(self, config: IclcaLlamaConfig):
        super().__init__(config)
        D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer in self.model.layers:  # per key/value head
            empty_patch_buffers(layer.self_attn, config.iclca_method, config.num_key_value_heads, config.iclca_entries,
                                config.iclca_feature_dim, D)
        shift_rotary(self.model.rotary_emb, config.iclca_prompt_tokens)
        self.config._attn_implementation = ATTENTION_NAME


__all__ = ["IclcaLlamaConfig", "IclcaLlamaForCausalLM"]
