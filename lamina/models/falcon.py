"""Falcon: parallel attention/MLP, one fused qkv matrix in three layouts, RoPE or ALiBi.

Layouts of `self_attention.query_key_value` rows, chosen by config fields:
- `new_decoder_architecture` (Falcon-40B/180B): per KV group, [q_1 .. q_g | k | v];
- `multi_query` (Falcon-7B): [all q heads | one k | one v];
- neither (Falcon-RW): per head, [q_h | k_h | v_h].
Norms: `ln_attn` + `ln_mlp` (40B), one `input_layernorm` shared by both branches (7B), or
`input_layernorm` + `post_attention_layernorm` when attention and MLP run in sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import (
    ALiBi,
    LayerCache,
    RotaryEmbedding,
    activation,
    apply_rotary,
    cached_attend,
    merge_heads,
)


@dataclass(kw_only=True)
class FalconConfig(ModelConfig):
    num_attention_heads: int
    num_kv_heads: int | None = None
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None
    alibi: bool = False
    bias: bool = False
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True

    hf_aliases: ClassVar[dict[str, str]] = {
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_head_kv": "num_kv_heads",
    }

    def __post_init__(self) -> None:
        self.ffn_hidden_size = self.ffn_hidden_size or 4 * self.hidden_size
        if self.new_decoder_architecture:
            self.num_kv_heads = self.num_kv_heads or self.num_attention_heads
            self.num_ln_in_parallel_attn = self.num_ln_in_parallel_attn or 2
        else:
            self.num_kv_heads = 1 if self.multi_query else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.grouped = config.new_decoder_architecture
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        # ALiBi is added before Falcon's 1/sqrt(D) scaling, so it is scaled with the scores.
        self.alibi = ALiBi(self.heads, self.head_dim**-0.5, bf16_products=True) if config.alibi else None

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused [B, T, (H + 2*Hkv)*D] -> q [B, H, T, D], k and v [B, Hkv, T, D]."""
        batch, seq, _ = qkv.shape
        if self.grouped or self.kv_heads == 1:
            # [B, T, Hkv, H/Hkv + 2, D]: each KV group's queries, then its key, then its value
            # (multi-query is the one-group case)
            qkv = qkv.view(batch, seq, self.kv_heads, self.heads // self.kv_heads + 2, self.head_dim)
            q = qkv[:, :, :, :-2].reshape(batch, seq, self.heads, self.head_dim)
            k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [B, T, Hkv, D]
        else:
            qkv = qkv.view(batch, seq, self.heads, 3, self.head_dim)  # per head [q | k | v]
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        q, k, v = self.split(self.query_key_value(x))
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attend(q, k, v, cache, self.layer_idx, start_pos, alibi=self.alibi)
        return self.dense(merge_heads(out))


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.self_attention = FalconAttention(config, layer_idx)
        self.mlp = FalconMLP(config)
        self.parallel = config.parallel_attn or config.new_decoder_architecture
        self.two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(hidden, eps=eps)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
            if not self.parallel:
                self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, rope, cache, start_pos)
        if self.parallel:
            return x + attn + self.mlp(mlp_in)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if not config.alibi:
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class FalconForCausalLM(CausalLM):
    config_class = FalconConfig
    no_split_modules = ("FalconDecoderLayer",)
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$",)
    base_model_prefix = "transformer"

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def cache_layout(self) -> list[tuple[int, int]]:
        return [(self.config.num_kv_heads, self.config.head_dim)] * self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        x = self.transformer.word_embeddings(input_ids)
        rope = None
        if not self.config.alibi:
            positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=x.device)
            rope = self.transformer.rotary_emb(positions, x.dtype)
        for layer in self.transformer.h:
            x = layer(x, rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))
