"""Gemma 2: sliding-window and full layers alternate (config.layer_types), attention logits soft-capped; both are
honoured by iclca's attention (a sliding layer keeps the prompt's last window-1 tokens), Taylor memories are refused
(they cannot express a soft cap)."""

from .base import Family

FAMILY = Family(model_type="gemma2", layers="model.layers.{i}.self_attn", positions="rotary",
                merged=("Gemma2Config", "Gemma2ForCausalLM"), peft=True)
