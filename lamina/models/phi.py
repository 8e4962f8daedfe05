"""Phi-1/1.5/2 (PhiForCausalLM): one LayerNorm feeding attention and MLP in parallel, partial rotary.

HF names: `model.layers.N.self_attn.{q,k,v}_proj` and `self_attn.dense`, `mlp.fc1` / `mlp.fc2`,
`model.final_layernorm`, and an `lm_head` with a bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import (
    LayerCache,
    RotaryEmbedding,
    activation,
    apply_rotary,
    cached_attend,
    merge_heads,
    split_heads,
)


@dataclass(kw_only=True)
class PhiConfig(ModelConfig):
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 0.5
    qk_layernorm: bool = False

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class PhiAttention(nn.Module):
    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.dense = nn.Linear(self.heads * self.head_dim, hidden)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.heads, self.head_dim)
        k = split_heads(self.k_proj(x), self.kv_heads, self.head_dim)
        v = split_heads(self.v_proj(x), self.kv_heads, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.dense(merge_heads(cached_attend(q, k, v, cache, self.layer_idx, start_pos)))


class PhiMLP(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)): attention and MLP read the same normed input."""

    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        normed = self.input_layernorm(x)
        return x + self.self_attn(normed, rope, cache, start_pos) + self.mlp(normed)


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.rotary_emb = RotaryEmbedding(rotary_dim, config.rope_theta, config.rope_scaling)


class PhiForCausalLM(CausalLM):
    config_class = PhiConfig
    no_split_modules = ("PhiDecoderLayer",)
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$",)

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def cache_layout(self) -> list[tuple[int, int]]:
        return [(self.config.num_key_value_heads, self.config.head_dim)] * self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=x.device)
        rope = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.final_layernorm(x))
