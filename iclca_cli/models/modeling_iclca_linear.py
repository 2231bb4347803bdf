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

This file is self-contained (torch + transformers only): `iclca merge` copies it into a
checkpoint folder so that the folder loads with `trust_remote_code=True` where `iclca_cli` is
not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


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

    def validate_architecture(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.position_embedding_type not in ("learned", "none"):
            raise ValueError(f"position_embedding_type must be 'learned' or 'none', got {self.position_embedding_type!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.position_offset < 0 or self.chunk_size < 1:
            raise ValueError("position_offset must be >= 0 and chunk_size >= 1")


# ---------------------------------------------------------------------------------------------
# Pure ops: feature maps and the two forms of causal linear attention.
# q, k are already feature-mapped. Shapes: q, k (B, H, T, F); v (B, H, T, Dv);
# memories S (B, H, F, Dv), z (B, H, F).
# ---------------------------------------------------------------------------------------------

FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


def linear_attention_parallel(q, k, v, S0, z0, eps):
    """Causal linear attention over a whole block at once; returns (out (B,H,T,Dv), S, z)."""
    A = torch.tril(q @ k.transpose(-1, -2))  # (B, H, T, T) causal scores phi(q_i).phi(k_j)
    num = A @ v + q @ S0  # (B, H, T, Dv)
    den = A.sum(-1) + (q @ z0.unsqueeze(-1)).squeeze(-1) + eps  # (B, H, T)
    out = num / den.unsqueeze(-1)  # (B, H, T, Dv)
    S = S0 + k.transpose(-1, -2) @ v  # (B, H, F, Dv)
    z = z0 + k.sum(-2)  # (B, H, F)
    return out, S, z


def linear_attention_step(q, k, v, S0, z0, eps):
    """One token (T = 1), the recurrent form decoding uses: fewer ops than the parallel form, which
    matters when each op is a few microseconds; returns (out (B,H,1,Dv), S, z)."""
    S = torch.baddbmm(S0.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2), v.flatten(0, 1)).view(S0.shape)
    z = z0 + k.squeeze(-2)  # (B, H, F)
    num = q @ S  # (B, H, 1, Dv)
    den = q @ z.unsqueeze(-1) + eps  # (B, H, 1, 1)
    return num / den, S, z


def linear_attention_chunked(q, k, v, S0, z0, eps, chunk_size):
    """The same map, chunk by chunk, carrying (S, z): memory is O(chunk_size^2), not O(T^2)."""
    T = q.shape[-2]
    outs = []
    S, z = S0, z0
    for start in range(0, T, chunk_size):
        sl = slice(start, start + chunk_size)
        out, S, z = linear_attention_parallel(q[..., sl, :], k[..., sl, :], v[..., sl, :], S, z, eps)
        outs.append(out)  # (B, H, C, Dv)
    return torch.cat(outs, dim=-2), S, z  # (B, H, T, Dv)


# ---------------------------------------------------------------------------------------------
# Recurrent state passed between calls (the linear-attention analogue of a KV cache).
# ---------------------------------------------------------------------------------------------


class LinearAttentionMemory:
    """Per-layer memories (S (B,H,F,Dv), z (B,H,F)) and the number of tokens they hold."""

    def __init__(self):
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.states)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


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

    def forward(self, hidden_states, attention_mask=None, initial_state=None):
        """hidden_states (B, T, C); attention_mask (B, T) with 0 at padding; returns (out, (S, z))."""
        B, T, C = hidden_states.size()
        H, D = self.num_heads, self.head_dim
        qkv = self.c_attn(hidden_states).view(B, T, 3, H, D).transpose(1, 3)  # (B, H, 3, T, D)
        qk = self.phi(qkv[:, :, :2])  # (B, H, 2, T, F)
        q, k, v = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]  # (B, H, T, F), (B, H, T, F), (B, H, T, Dv)
        if attention_mask is not None:
            k = k * attention_mask[:, None, :, None].to(k.dtype)  # padding adds nothing to the memories
        if initial_state is None:
            S0 = self.memory_kv.to(q.dtype).expand(B, -1, -1, -1)  # (B, H, F, Dv)
            z0 = self.memory_k.to(q.dtype).expand(B, -1, -1)  # (B, H, F)
        else:
            S0, z0 = initial_state
        if T == 1:
            out, S, z = linear_attention_step(q, k, v, S0, z0, self.eps)
        elif T > self.chunk_size:
            out, S, z = linear_attention_chunked(q, k, v, S0, z0, self.eps, self.chunk_size)
        else:
            out, S, z = linear_attention_parallel(q, k, v, S0, z0, self.eps)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(out), (S, z)


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

    def forward(self, x, attention_mask=None, initial_state=None):
        a, state = self.attn(self.ln_1(x), attention_mask, initial_state)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, state


class IclcaLinearPreTrainedModel(PreTrainedModel):
    config_class = IclcaLinearConfig
    config: IclcaLinearConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["IclcaLinearBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is LinearAttentionMemory, created by forward when use_cache is on

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
        past_key_values: LinearAttentionMemory | None = None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask[:, -T:]  # generate() passes the mask of past tokens too
        if self.config.position_embedding_type == "learned":
            if position_ids is None:
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
        cache = LinearAttentionMemory() if use_cache else None
        for i, block in enumerate(self.h):
            initial = past_key_values.states.get(i) if past_key_values is not None else None
            x, state = block(x, attention_mask, initial)
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen_tokens = past + T
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), past_key_values=cache)


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
        past_key_values: LinearAttentionMemory | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
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
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = [
    "IclcaLinearConfig",
    "IclcaLinearModel",
    "IclcaLinearForCausalLM",
    "LinearAttentionMemory",
    "linear_attention_parallel",
    "linear_attention_chunked",
    "linear_attention_step",
]
