"""A transformers model whose every layer keeps its state in a transformers cache (state-space, linear-attention,
short-convolution and hybrid models: Mamba2, LFM2, Qwen3-Next, ...), with a prompt folded in: every sequence starts
from the cache the prompt left behind.

The patch is that cache, as buffers on the decoder layers (`<layer>.conv_state_<j>`, `<layer>.recurrent_state_<j>`,
and for attention layers `<layer>.prompt_keys` / `<layer>.prompt_values`), each in its own dtype (Mamba2-style
recurrent states stay float32 in a float64 or bfloat16 model), listed in config.iclca_buffers with the decoder
layers in config.iclca_layer_paths and P in config.iclca_position_offset. A forward pre-hook on the backbone:
- when a call brings no cache, or an empty one (a new sequence: `generate()` makes an empty DynamicCache), fills it
  from the buffers, expanded to the batch, so that the call continues the prompt;
- counts the caller's positions from the query's first token, as for the model on the query alone: position_ids
  (which `generate()` passes) get P added, and a 2D attention mask gets P ones in front where attention layers
  attend over the prompt's keys.
Needs torch and transformers only: merged folders carry it inside their one modeling file.
"""

from __future__ import annotations

import sys

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from ..ops.softmax_attention import ATTENTION_NAME
from .stock_init import StockInit

STATE_KINDS = ("conv_state", "recurrent_state")


# Three forms of state: transformers' Cache (`.layers`: LinearAttentionLayer / DynamicLayer / ...); a model's own
# recurrent cache (`.rnn_state`: {layer: (state, ...)} and `.seqlen_offset`; xLSTM), config.iclca_cache_class; and a
# list of state tensors (B, hidden, layers) passed as `state=` (RWKV), config.iclca_cache_kwarg = "state".


def holds_tokens(cache) -> bool:
    """Whether a cache already holds a sequence's past (then the prompt is in it, or it is not the patched run)."""
    if hasattr(cache, "rnn_state"):
        return int(cache.seqlen_offset.max()) > 0
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin) and any(layer.has_previous_state.values()):
            return True
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            return True
    return False


def prompt_states(model: torch.nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Layer index -> {buffer name: tensor} of the prompt's cache: the buffers config.iclca_buffers names, each in
    the dtype recorded there (loading a checkpoint in another dtype may have cast the buffer)."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    index = {path: i for i, path in enumerate(model.config.iclca_layer_paths)}
    for name, (_, dtype) in model.config.iclca_buffers.items():
        path, buffer = name.rsplit(".", 1)
        if path in index:  # (a compressed hybrid's attention modules hold their summary themselves)
            states.setdefault(index[path], {})[buffer] = model.get_buffer(name).to(getattr(torch, dtype))
    return states


def prompt_in_cache(model: torch.nn.Module) -> bool:
    """Whether the attention layers' cache starts with the prompt's keys (exact), or holds only the query's, the
    prompt being a summary on the attention modules (compressed)."""
    return any(name.endswith(".prompt_keys") for name in model.config.iclca_buffers)


def state_list(states: dict[int, dict[str, torch.Tensor]], batch: int) -> list[torch.Tensor]:
    """RWKV's form: state j is (B, hidden, layers), layer i's recurrent_state_j in [:, :, i]; fresh tensors (the
    model updates them in place)."""
    layers = [states[i] for i in sorted(states)]
    return [torch.stack([layer[f"recurrent_state_{j}"] for layer in layers], dim=-1).unsqueeze(0).repeat(batch, 1, 1)
            for j in range(len(layers[0]))]


def new_cache(model: torch.nn.Module, batch: int, like: torch.Tensor):
    """An empty cache of the model's own kind for `batch` sequences (the first two forms)."""
    name = getattr(model.config, "iclca_cache_class", None)
    if name is None:
        return DynamicCache(config=model.config)
    cls = getattr(sys.modules[type(model.base_model).__module__], name)
    return cls(config=model.config, max_batch_size=batch, dtype=like.dtype, device=like.device)


@torch.no_grad()
def fill_cache(cache, states: dict[int, dict[str, torch.Tensor]], batch: int, prompt_tokens: int,
               counts_prompt: bool = True) -> None:
    """Put the prompt's states (without batch dimension) into an empty cache, for `batch` sequences. `counts_prompt`:
    the cache's token count includes the prompt's (False for a compressed hybrid, whose attention layers' caches
    hold only the query's tokens)."""
    if hasattr(cache, "rnn_state"):
        for i, buffers in states.items():
            for j, state in enumerate(cache.rnn_state[i]):
                t = buffers[f"recurrent_state_{j}"]
                state.copy_(t.unsqueeze(0).expand(batch, *t.shape))
        cache.seqlen_offset += prompt_tokens
        cache.rnn_state_initial = False
        return
    for i, buffers in states.items():
        layer = cache.layers[i]
        for name, t in buffers.items():
            if name.startswith(STATE_KINDS):
                kind, j = name.rsplit("_", 1)
                j = int(j)
                state = t.unsqueeze(0).expand(batch, *t.shape)  # (B, ...)
                if kind == "conv_state":
                    layer.lazy_initialization(conv_states=state, state_idx=j, conv_kernel_size=t.shape[-1])
                    layer.conv_states[j].copy_(state)
                else:
                    layer.lazy_initialization(recurrent_states=state, state_idx=j)
                    layer.recurrent_states[j].copy_(state)
                layer.has_previous_state[j] = True  # set by transformers only on conv updates
        if hasattr(layer, "cumulative_length_linear") and counts_prompt:
            # upstream (transformers 5.25, cache_utils): a linear layer counts the tokens it has seen
            # (`cumulative_length_linear`, advanced by conv updates only) and `DynamicCache.get_seq_length()` reads
            # layer 0 whatever its kind, so a model whose first layer is linear (LFM2, Qwen3-Next, Bamba, Zamba2) numbers the
            # query's positions from this count: the prompt's P tokens are in the cache, so they count
            layer.cumulative_length_linear.fill_(prompt_tokens)
        if "prompt_keys" in buffers:
            keys, values = buffers["prompt_keys"], buffers["prompt_values"]  # (Hkv, P, D)
            layer.update(keys.unsqueeze(0).expand(batch, *keys.shape), values.unsqueeze(0).expand(batch, *values.shape))
            if hasattr(layer, "cumulative_length"):  # a sliding-window layer keeps fewer keys than tokens seen
                layer.cumulative_length = prompt_tokens


def start_from_prompt(backbone, args, kwargs):
    """Forward pre-hook on the backbone (see the module docstring)."""
    model = backbone.iclca_patched
    x = kwargs.get("input_ids", args[0] if args else None)
    x = kwargs.get("inputs_embeds") if x is None else x
    batch, T = x.shape[:2]
    P = model.config.iclca_position_offset
    if getattr(model.config, "iclca_cache_kwarg", "cache") == "state":  # RWKV: a given state holds the past
        if kwargs.get("state") is None:
            kwargs["state"], kwargs["use_cache"] = state_list(prompt_states(model), batch), True
        return args, kwargs
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    in_cache = prompt_in_cache(model)
    if cache is None or not holds_tokens(cache):
        like = model.get_buffer(next(iter(model.config.iclca_buffers)))
        cache = new_cache(model, batch, like) if cache is None else cache
        fill_cache(cache, prompt_states(model), batch, P, counts_prompt=in_cache)
        kwargs.pop("past_key_values", None)
        kwargs["cache"], kwargs["use_cache"] = cache, True
    attention = hasattr(cache, "layers") and not all(cache.is_linear)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    elif attention and (getattr(model.config, "iclca_count_positions", False) or not in_cache):
        # upstream: BambaModel numbers a call's tokens from 0 whatever its cache holds; and a compressed hybrid's
        # cache holds only the query's tokens: count them from the cache, after the prompt's P
        past = cache.get_seq_length() + (0 if in_cache else P)
        kwargs["position_ids"] = torch.arange(past, past + T, device=x.device).unsqueeze(0)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and attention and in_cache:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, P), mask], dim=-1)
    return args, kwargs


def stepwise_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """A mixer's forward that continues from its cache one token at a time (upstream: the Mamba (1) mixers' full-
    sequence scan takes no initial state, so a multi-token call with a cache restarts the SSM from zero; the
    one-token path reads and updates the state)."""
    forward = super(type(self), self).forward
    T = hidden_states.shape[1]
    if cache is None or T == 1 or cache.get_recurrent_state(self.layer_idx) is None:
        return forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    outs = [forward(hidden_states[:, t:t + 1], cache=cache,
                    attention_mask=None if attention_mask is None else attention_mask[:, t:t + 1], **kwargs)
            for t in range(T)]
    return torch.cat(outs, dim=1)


_STEPWISE: dict[type, type] = {}


def step_mixers(model: torch.nn.Module, suffix: str) -> None:
    """Give every module whose class name ends with `suffix` the stepwise forward (a subclass, made once)."""
    for module in model.modules():
        cls = type(module)
        if cls.__name__.endswith(suffix) and cls not in _STEPWISE.values():
            module.__class__ = _STEPWISE.setdefault(cls, type(f"Stepwise{cls.__name__}", (cls,),
                                                              {"forward": stepwise_forward}))


def start_backbone_from_prompt(model: torch.nn.Module) -> None:
    """Register the pre-hook on the model's backbone (once), and the fixes its family needs."""
    backbone = model.base_model
    if not hasattr(backbone, "iclca_patched"):
        backbone.register_forward_pre_hook(start_from_prompt, with_kwargs=True)
    object.__setattr__(backbone, "iclca_patched", model)  # not a submodule: the backbone is the model's own
    if getattr(model.config, "iclca_step_modules", None):
        step_mixers(model, model.config.iclca_step_modules)
    if any(name.endswith(".prefix_keys") for name in model.config.iclca_buffers):  # compressed attention layers
        model.config._attn_implementation = ATTENTION_NAME


class PatchedCacheModel(StockInit):
    """Mixin, listed before the stock class: `class IclcaMamba2ForCausalLM(PatchedCacheModel, Mamba2ForCausalLM)`:
    zero buffers of the shapes and dtypes in config.iclca_buffers, which the checkpoint fills, and the hook."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, (shape, dtype) in config.iclca_buffers.items():
            path, buffer = name.rsplit(".", 1)
            self.get_submodule(path).register_buffer(buffer, torch.zeros(shape, dtype=getattr(torch, dtype)))
        start_backbone_from_prompt(self)
