"""The classes of merged folders, from one spec per family (`Family.merged`, the stock transformers classes):

    class IclcaQwen2Config(Qwen2Config): model_type = "iclca_qwen2"
    class IclcaQwen2ForCausalLM(PatchedDecoder, Qwen2ForCausalLM): config_class = IclcaQwen2Config

made here as Python classes for iclca (registered with the Auto classes), and written as source into the one
self-contained modeling file a merged folder carries (bundle.py inlines PatchedDecoder and iclca's attention).
A family with its own modeling module (`Family.modeling`, iclca_linear) uses that module's AUTO_CLASSES for both.
"""

from __future__ import annotations

import functools
import importlib

from ..bundle import PACKAGE_DIR, standalone_source
from ..families import Family, all_families
from .patched_cache import PatchedCacheModel
from .patched_decoder import PatchedDecoder

CLASSES = '''
class {config}({base_config}):
    """A {base_config} whose model carries a folded-in prompt (the config's iclca_* entries)."""

    model_type = "{model_type}"


class {model}({mixin}, {base_model}):
    config_class = {config}
'''
# The mixin a stock family's merged class adds, by how its queries start at P, and the module that defines it.
MIXINS = {"cache": (PatchedCacheModel, "models/patched_cache.py", "every sequence starts from the cache the prompt left")}
DEFAULT_MIXIN = (PatchedDecoder, "models/patched_decoder.py",
                 "prefix, compressed or Taylor patch buffers on its attention modules")


@functools.cache
def auto_classes(family: Family) -> dict[str, type]:
    """{"AutoConfig": ..., "AutoModelForCausalLM": ...} of the family's merged folders, as iclca loads them."""
    if family.modeling is not None:
        return importlib.import_module(f"{__package__}.{family.modeling}").AUTO_CLASSES
    import transformers

    base_config, base_model = (getattr(transformers, name) for name in family.merged)
    config = type(f"Iclca{base_config.__name__}", (base_config,), {
        "model_type": family.merged_model_type, "__module__": __name__,
        "__doc__": f"A {base_config.__name__} whose model carries a folded-in prompt."})
    mixin = MIXINS.get(family.positions, DEFAULT_MIXIN)[0]
    model = type(f"Iclca{base_model.__name__}", (mixin, base_model), {"config_class": config, "__module__": __name__})
    return {"AutoConfig": config, "AutoModelForCausalLM": model}


def modeling_file(family: Family) -> tuple[str, str, dict[str, str]]:
    """(file name, source, auto_map) of the self-contained modeling file the family's merged folders carry."""
    name = f"modeling_{family.merged_model_type}"
    auto_map = {auto: f"{name}.{cls.__name__}" for auto, cls in auto_classes(family).items()}
    if family.modeling is not None:
        module = importlib.import_module(f"{__package__}.{family.modeling}")
        source = standalone_source([PACKAGE_DIR / "models" / f"{family.modeling}.py"], module.__doc__.splitlines()[0])
        return f"{name}.py", source, auto_map
    classes = auto_classes(family)
    mixin, module, what = MIXINS.get(family.positions, DEFAULT_MIXIN)
    tail = CLASSES.format(config=classes["AutoConfig"].__name__, base_config=family.merged[0],
                          model=classes["AutoModelForCausalLM"].__name__, mixin=mixin.__name__,
                          base_model=family.merged[1], model_type=family.merged_model_type)
    source = standalone_source([PACKAGE_DIR / module], f"{family.merged[1]} with a prompt folded in by iclca: {what}.",
                               tail_imports=(f"from transformers import {', '.join(family.merged)}",), tail=tail)
    return f"{name}.py", source, auto_map


def register(family: Family) -> None:
    """Let the Auto classes load the family's merged folders (and a family's own models) without remote code."""
    import transformers

    classes = auto_classes(family)
    transformers.AutoConfig.register(family.merged_model_type, classes["AutoConfig"], exist_ok=True)
    for auto, cls in classes.items():
        if auto != "AutoConfig":
            getattr(transformers, auto).register(classes["AutoConfig"], cls, exist_ok=True)


def register_model_type(model_type: str) -> None:
    """Register the family whose base or merged model type this is, if iclca knows one (loading registers only
    what it loads: every family at once would import every model's modeling code)."""
    for family in all_families().values():
        if model_type in (family.model_type, family.merged_model_type):
            register(family)


def register_auto_classes() -> None:
    for family in all_families().values():
        register(family)
