"""Model classes iclca registers with the transformers Auto classes: its own `iclca_linear` family, and the classes
of every family's merged folders (`iclca_gpt2`, `iclca_llama`, ...). Importing this package registers them all, for
people who use the Auto classes directly; iclca's own loading registers only the family it loads."""

from .merged import register_auto_classes
from .modeling_iclca_linear import IclcaLinearCache, IclcaLinearConfig, IclcaLinearForCausalLM, IclcaLinearModel

register_auto_classes()

__all__ = ["IclcaLinearCache", "IclcaLinearConfig", "IclcaLinearForCausalLM", "IclcaLinearModel"]
