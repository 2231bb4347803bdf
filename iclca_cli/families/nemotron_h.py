"""Nemotron-H: Mamba2 layers, attention layers, and MLP / mixture-of-experts layers that keep no state."""

from .base import Family

FAMILY = Family(model_type="nemotron_h", layers="model.layers.{i}", positions="cache",
                attention="mixer", merged=("NemotronHConfig", "NemotronHForCausalLM"))
