"""A transformers softmax decoder with a prompt folded in: what a merged folder's classes add to the stock ones.

`PatchedDecoder` is a mixin for a stock causal-LM class (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, ...):
- zero buffers of the shapes in config.iclca_buffers ({"<module path>.<buffer>": [shape, dtype]}), which the
  checkpoint fills: prefix keys/values (+ score bias) or Taylor memories on each attention module;
- query positions offset by config.iclca_position_offset on the rotary modules in config.iclca_rotary_modules
  (a learned position table needs nothing: the checkpoint's table is already shifted);
- attention switched to iclca's (ops/softmax_attention.py).
Needs torch and transformers only: merged folders carry it inside their one modeling file.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.softmax_attention import ATTENTION_NAME
from .stock_init import StockInit


def offset_positions(module, args, kwargs):
    """Forward pre-hook on a rotary embedding module, forward(x, position_ids, ...): position ids + the module's
    iclca_position_offset."""
    offset = module.iclca_position_offset
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"] + offset
    else:
        args = (args[0], args[1] + offset, *args[2:])
    return args, kwargs


def shift_rotary(rotary: nn.Module, offset: int) -> None:
    """Queries at positions offset, offset+1, ...: a pre-hook on the rotary module (registered once)."""
    if not hasattr(rotary, "iclca_position_offset"):
        rotary.register_forward_pre_hook(offset_positions, with_kwargs=True)
    rotary.iclca_position_offset = offset


class PatchedDecoder(StockInit):
    """Mixin, listed before the stock class: `class IclcaLlamaForCausalLM(PatchedDecoder, LlamaForCausalLM)`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, (shape, dtype) in config.iclca_buffers.items():
            path, buffer = name.rsplit(".", 1)
            self.get_submodule(path).register_buffer(buffer, torch.zeros(shape, dtype=getattr(torch, dtype)))
        for path in config.iclca_rotary_modules:
            shift_rotary(self.get_submodule(path), config.iclca_position_offset)
        self.config._attn_implementation = ATTENTION_NAME
