"""Model families iclca knows, and their registration with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling_iclca_linear import IclcaLinearConfig, IclcaLinearForCausalLM, IclcaLinearModel

MODELING_FILES = {"iclca_linear": "modeling_iclca_linear.py"}


def register_auto_classes() -> None:
    """Make `model_type = "iclca_linear"` loadable with AutoConfig / AutoModel(ForCausalLM)."""
    AutoConfig.register("iclca_linear", IclcaLinearConfig, exist_ok=True)
    AutoModel.register(IclcaLinearConfig, IclcaLinearModel, exist_ok=True)
    AutoModelForCausalLM.register(IclcaLinearConfig, IclcaLinearForCausalLM, exist_ok=True)
