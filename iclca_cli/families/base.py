"""What a model family is to iclca: where its token-mixing layers are, what kind each layer is, how a query's
positions start at P, and which transformers classes its merged folders subclass. Pure data: no torch here.

Layer kinds are transformers' own names (`config.layer_types`); which methods act on which kinds is the methods'
business (methods/). Where a family's state lives (`state`) picks the handler that converts and attaches a patch
(handlers.py). A sliding-window layer always keeps the prompt's last window-1 tokens exactly (bounded by the
window, and nothing else can expire entries as the query moves on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOFTMAX_KINDS = ("full_attention", "sliding_attention")
LINEAR_KINDS = ("linear_attention",)
# A family whose every layer keeps its state in a transformers cache is patched on these kinds (mlp/moe layers
# keep none): the patch is the whole cache after the prompt.
CACHE_KINDS = ("linear_attention", "conv", "hybrid", "full_attention", "sliding_attention", "mlp", "moe")
# Where a family's state lives, which decides the handler (handlers.py):
#   attention - softmax attention layers: their keys and values, or what a method makes of them (softmax_layers);
#   buffers   - the model's own bias buffers, filled from its linear-attention cache (iclca_linear; linear_layers);
#   cache     - a transformers cache every layer keeps its state in (cache_layers).
STATES = ("attention", "buffers", "cache")
# How a query's positions start at P:
#   rotary  - a forward pre-hook adds P to the position ids every rotary embedding module receives;
#   learned - the learned position table (`position_table`) is shifted by P rows (row i = position P + i);
#   config  - the model's own config.position_offset (iclca_linear);
#   cache   - the prompt's tokens are in the cache every sequence starts from, so the model counts from P itself
#             (models/patched_cache.py; caller's position ids and masks are shifted by P);
#   none    - no positions (NoPE, recurrent layers): nothing to do.
POSITION_POLICIES = ("rotary", "learned", "config", "cache", "none")
# Tiny configs (Family.tiny) use a 61-token vocabulary with these special ids; random prompts stay above them.
SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type of the base models
    layers: str  # path of layer i's token-mixing module, e.g. "model.layers.{i}.self_attn"
    positions: str  # one of POSITION_POLICIES
    state: str = "attention"  # one of STATES
    position_table: str | None = None  # the embedding whose rows are positions, if any: "learned" shifts it; its
    #                                    rows are a hard limit on prompt + query
    merged: tuple[str, str] | None = None  # transformers (config, model) classes that merged folders subclass
    modeling: str | None = None  # or: a module of iclca_cli.models with the family's own classes (AUTO_CLASSES),
    #                              which carry a patch themselves; merged folders carry it, bundled
    peft: bool = False  # `iclca export-peft`: PEFT prefix tuning reproduces this family's prefix patches exactly
    state_names: tuple[str, ...] = ()  # linear layers: patch tensor name of each recurrent state in the cache
    # Fixes for transformers models that do not continue from a cache as they should (models/patched_cache.py):
    step_modules: str | None = None  # class-name suffix of mixers fed one token at a time when continuing
    count_positions: bool = False  # give the backbone position ids counted from the cache
    cache_class: str | None = None  # a model's own recurrent cache class (in its modeling module), if not a Cache
    cache_kwarg: str = "cache"  # the forward argument (and output field) that carries the state ("state": RWKV)
    shares_weights: bool = True  # False: the model changes its weights in place, so a patched copy gets its own
    restore_weights: str | None = None  # backbone method that, in train mode, puts weights it changed in place back
    attention: str | None = None  # a hybrid's attention module within a layer ("self_attn"): takes `compressed`
    layer_kind: str | None = None  # every layer's kind, where the config does not say
    # The family's published layout at tiny widths (config keyword arguments of merged[0]; the checkpoint it follows
    # is named beside it): the self-test (selftest.py) and the contract tests build random models from it.
    tiny: dict | None = field(default=None, compare=False)
    noise: float = 0.0  # float64 runs: what the stock model itself differs by between continuing from its cache and
    #                     one pass, where it computes parts in float32 (Mamba2's scan, the delta rules); else 0

    def __post_init__(self):
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"{self.model_type}: positions must be one of {POSITION_POLICIES}")
        if self.state not in STATES or (self.state == "cache") != (self.positions == "cache"):
            raise ValueError(f"{self.model_type}: state must be one of {STATES}, and 'cache' where positions are")
        if (self.merged is None) == (self.modeling is None):
            raise ValueError(f"{self.model_type}: name either the stock classes to subclass or an own modeling module")
        if self.positions == "learned" and self.position_table is None:
            raise ValueError(f"{self.model_type}: a learned position policy names its position_table")

    def layer_kinds(self, config) -> list[str]:
        """Each layer's kind: config.layer_types where the model has it, else transformers' own rule (a model with
        a sliding_window slides in every layer)."""
        kinds = getattr(config, "layer_types", None)
        if kinds is None and self.layer_kind is not None:
            kinds = [self.layer_kind] * config.num_hidden_layers
        if kinds is None:
            kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
            kinds = [kind] * config.num_hidden_layers
        return list(kinds)

    def layer_paths(self, config) -> list[str]:
        return [self.layers.format(i=i) for i in range(config.num_hidden_layers)]

    @property
    def stock_cache_continues(self) -> bool:
        """The stock model continues from a prompt's cache as it reads prompt + query in one pass, so `iclca eval`
        can read the prompt once: every family but those iclca has to fix (mixers fed one token at a time, positions
        not counted from the cache) and those whose state is not a transformers Cache."""
        return not (self.step_modules or self.count_positions or self.cache_class or self.cache_kwarg != "cache")

    @property
    def merged_model_type(self) -> str:
        return self.model_type if self.merged is None else f"iclca_{self.model_type}"
