"""Phi-3 (and Phi-4-mini): a Llama-shaped decoder whose q/k/v and gate/up projections are fused.

The fused matrices stay fused, as HF stores them (`self_attn.qkv_proj`, `mlp.gate_up_proj`): one
matmul each, split afterwards, and each remains a plain nn.Linear for quantization. Partial rotary
(Phi-4-mini), LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini) and a sliding window (Phi-3-mini-4k) are
config fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import LayerCache, RMSNorm, RotaryEmbedding, activation, apply_rotary, cached_attend


@dataclass(kw_only=True)
class Phi3Config(ModelConfig):
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class Phi3Attention(nn.Module):
    """GQA attention over one fused projection: rows are [q heads | k heads | v heads]."""

    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.sliding_window = config.sliding_window
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        # [B, T, H*D] -> [B, T, H, D] -> [B, H, T, D]
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attend(q, k, v, cache, self.layer_idx, start_pos, self.sliding_window)
        # [B, H, T, D] -> [B, T, H*D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, q_size))


class Phi3MLP(nn.Module):
    """down(act(gate) * up) with gate and up computed by one fused matrix [gate rows | up rows]."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling)


class Phi3ForCausalLM(CausalLM):
    config_class = Phi3Config
    no_split_modules = ("Phi3DecoderLayer",)
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$",)

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        # with a cache, LongRoPE picks its factors by the cache's length (see RotaryEmbedding)
        rope = self.model.rotary_emb(positions, x.dtype, cache.max_len if cache is not None else None)
        for layer in self.model.layers:
            x = layer(x, rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
