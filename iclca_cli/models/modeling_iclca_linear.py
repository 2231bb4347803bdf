"""A GPT-2-style causal LM with linearized attention and in-context bias terms (ICLCA).

Reference: Chen, Hu, Jin, Lee, Kawaguchi, "Exact Conversion of In-Context Learning to Model
Weights in Linearized-Attention Transformers", ICML 2024 (arXiv 2406.02847).

Per layer and head, with a feature map phi (elu+1 or relu):

    o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)
    S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T     (F, Dv)   the key-value memory
    z_i = z_0 + sum_{j<=i} phi(k_j)           (F,)      the normaliser memory

S_0 and z_0 are the buffers `memory_kv` and `memory_k` of every attention module (zero in a plain
model): the bias terms that a converted prompt becomes. `config.position_offset` says where the
first token of a sequence sits, so that a query follows the prompt that was folded in.

State between calls lives in a transformers cache (`IclcaLinearCache`, a `DynamicCache(config=...)`
whose linear-attention layers hold S and z), passed as `cache=` (`past_key_values=` is an alias);
positions come from `position_ids` when given (as `generate()` gives them), else from the cache.

Merged folders carry this file bundled with ops/linear_attention.py (torch + transformers only),
so that they load with `trust_remote_code=True` where `iclca_cli` is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..ops.linear_attention import FEATURE_MAPS, linear_attention


@strict
class IclcaLinearConfig(PreTrainedConfig):
    """Configuration of an `iclca_linear` model (HF field names where HF has one)."""

    model_type = "iclca_linear"

    vocab_size: int = 256  # tokens in the vocabulary
    hidden_size: int = 128  # width of the residual stream
    num_hidden_layers: int = 2  # transformer blocks
    num_attention_heads: int = 4  # heads per attention layer; head size = hidden_size // heads
    max_position_embeddings: int = 1024  # rows of the learned position table
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
    feature_map: str = "elu+1"  # phi: "elu+1" or "relu"
    position_embedding_type: str = "learned"  # "learned" (absolute table) or "none"
    attention_eps: float = 1e-6  # added to the normaliser phi(q).z
    position_offset: int = 0  # position of a sequence's first token (tokens folded into the memories)
    chunk_size: int = 256  # sequences longer than this run in the chunked recurrent form
    initializer_range: float = 0.02  # std of the normal initialisation
    use_cache: bool = True  # return the recurrent memories for incremental decoding
    tie_word_embeddings: bool = True  # lm_head shares the token embedding
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    number_of_conv_states = 2  # states per cache layer (transformers' name): S and z

    @property
    def layer_types(self) -> list[str]:
        return ["linear_attention"] * self.num_hidden_layers

    def validate_architecture(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.position_embedding_type not in ("learned", "none"):
            raise ValueError(f"position_embedding_type must be 'learned' or 'none', got {self.position_embedding_type!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.position_offset < 0 or self.chunk_size < 1:
            raise ValueError("position_offset must be >= 0 and chunk_size >= 1")


class IclcaLinearCache(DynamicCache):
    """transformers' DynamicCache for an iclca_linear model: one LinearAttentionLayer per layer, whose recurrent
    state 0 is the key-value memory S (B, H, F, Dv) and state 1 the normaliser memory z (B, H, F); plus the tokens
    seen so far, which linear layers alone cannot tell (the position of the next token)."""

    def __init__(self, config: IclcaLinearConfig):
        super().__init__(config=config)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class IclcaLinearAttention(nn.Module):
    """Multi-head causal linear attention whose memories start at the buffers memory_kv/memory_k."""

    def __init__(self, config: IclcaLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.eps = config.attention_eps
        self.chunk_size = config.chunk_size
        self.phi = FEATURE_MAPS[config.feature_map]
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        H, D = self.num_heads, self.head_dim
        # The bias terms of ICLCA: the memories a folded-in prompt leaves behind (F = Dv = D here).
        self.register_buffer("memory_kv", torch.zeros(H, D, D))  # (H, F, Dv)
        self.register_buffer("memory_k", torch.zeros(H, D))  # (H, F)

    def initial_state(self, batch: int, dtype: torch.dtype, cache: DynamicCache | None):
        """(S0 (B,H,F,Dv), z0 (B,H,F)): the cache's memories after earlier tokens, else the bias buffers."""
        if cache is not None and cache.get_recurrent_state(self.layer_idx, 0) is not None:
            return cache.get_recurrent_state(self.layer_idx, 0), cache.get_recurrent_state(self.layer_idx, 1)
        return self.memory_kv.to(dtype).expand(batch, -1, -1, -1), self.memory_k.to(dtype).expand(batch, -1, -1)

    def forward(self, hidden_states, attention_mask=None, cache: DynamicCache | None = None):
        """hidden_states (B, T, C); attention_mask (B, T) with 0 at padding; the memories after the last token go
        into the cache."""
        B, T, C = hidden_states.size()
        H, D = self.num_heads, self.head_dim
        qkv = self.c_attn(hidden_states).view(B, T, 3, H, D).transpose(1, 3)  # (B, H, 3, T, D)
        qk = self.phi(qkv[:, :, :2])  # (B, H, 2, T, F)
        q, k, v = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]  # (B, H, T, F), (B, H, T, F), (B, H, T, Dv)
        if attention_mask is not None:
            k = k * attention_mask[:, None, :, None].to(k.dtype)  # padding adds nothing to the memories
        S0, z0 = self.initial_state(B, q.dtype, cache)
        out, S, z = linear_attention(q, k, v, S0, z0, self.eps, self.chunk_size)  # (B, H, T, Dv)
        if cache is not None:
            for idx, state in enumerate((S, z)):
                cache.update_recurrent_state(state, self.layer_idx, state_idx=idx)
                cache.layers[self.layer_idx].has_previous_state[idx] = True  # only conv updates set it themselves
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(out)


class IclcaLinearMLP(nn.Module):
    def __init__(self, config: IclcaLinearConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class IclcaLinearBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: IclcaLinearConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = IclcaLinearAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = IclcaLinearMLP(config)

    def forward(self, x, attention_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attention_mask, cache)
        return x + self.mlp(self.ln_2(x))


class IclcaLinearPreTrainedModel(PreTrainedModel):
    config_class = IclcaLinearConfig
    config: IclcaLinearConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["IclcaLinearBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() leaves the cache to forward, which makes an IclcaLinearCache

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, IclcaLinearAttention):
            module.memory_kv.zero_()
            module.memory_k.zero_()


def _tokens_before(cache: DynamicCache | None) -> int:
    """Tokens the cache holds: an IclcaLinearCache counts them; another cache can say only whether it is empty."""
    if cache is None:
        return 0
    if isinstance(cache, IclcaLinearCache):
        return cache.seen_tokens
    if any(cache.has_previous_state(i) for i in range(len(cache.layers))):
        raise ValueError("a cache of linear layers cannot tell the next position: pass position_ids, or the "
                         "IclcaLinearCache the model returned")
    return 0


class IclcaLinearModel(IclcaLinearPreTrainedModel):
    def __init__(self, config: IclcaLinearConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList([IclcaLinearBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: DynamicCache | None = None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values: DynamicCache | None = None,  # the pre-5.24 name of `cache`
        **kwargs,
    ):
        cache = past_key_values if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if attention_mask is not None:
            attention_mask = attention_mask[:, -T:]  # generate() passes the mask of past tokens too
        if self.config.position_embedding_type == "learned":
            if position_ids is None:
                past = _tokens_before(cache)
                position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0)  # (1, T)
            position_ids = position_ids + self.config.position_offset  # queries follow the folded prompt
            last = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if last > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence needs position {last - 1} but the model has {self.config.max_position_embeddings} "
                    f"positions ({self.config.position_offset} taken by the folded-in prompt)"
                )
            x = x + self.wpe(position_ids)  # (B, T, C)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = IclcaLinearCache(self.config)
        for block in self.h:
            x = block(x, attention_mask, cache if use_cache else None)
        if use_cache and isinstance(cache, IclcaLinearCache):
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), cache=cache if use_cache else None)


class IclcaLinearForCausalLM(IclcaLinearPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: IclcaLinearConfig):
        super().__init__(config)
        self.transformer = IclcaLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: DynamicCache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        past_key_values: DynamicCache | None = None,  # the pre-5.24 name of `cache`
        **kwargs,
    ):
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values if cache is None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state  # (B, T, C)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


AUTO_CLASSES = {"AutoConfig": IclcaLinearConfig, "AutoModel": IclcaLinearModel,
                "AutoModelForCausalLM": IclcaLinearForCausalLM}
