"""Model families iclca knows, and their registration with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling_iclca_gpt2 import IclcaGPT2Config, IclcaGPT2LMHeadModel
from .modeling_iclca_llama import IclcaLlamaConfig, IclcaLlamaForCausalLM
from .modeling_iclca_linear import IclcaLinearConfig, IclcaLinearForCausalLM, IclcaLinearModel


def register_auto_classes() -> None:
    """Make `iclca_linear` models and merged `iclca_gpt2` / `iclca_llama` folders loadable with the Auto classes."""
    AutoConfig.register("iclca_linear", IclcaLinearConfig, exist_ok=True)
    AutoModel.register(IclcaLinearConfig, IclcaLinearModel, exist_ok=True)
    AutoModelForCausalLM.register(IclcaLinearConfig, IclcaLinearForCausalLM, exist_ok=True)
    AutoConfig.register("iclca_gpt2", IclcaGPT2Config, exist_ok=True)
    AutoModelForCausalLM.register(IclcaGPT2Config, IclcaGPT2LMHeadModel, exist_ok=True)
    AutoConfig.register("iclca_llama", IclcaLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(IclcaLlamaConfig, IclcaLlamaForCausalLM, exist_ok=True)
