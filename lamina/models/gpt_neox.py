"""GPT-NeoX (Pythia, StableLM-base-alpha, RedPajama-INCITE): parallel residual, partial rotary.

HF names: `gpt_neox.embed_in`, `gpt_neox.layers.N.attention.query_key_value` (q/k/v interleaved
per head: the rows of head h are [q_h | k_h | v_h]), `attention.dense`, `mlp.dense_h_to_4h`,
`mlp.dense_4h_to_h`, `gpt_neox.final_layer_norm` and an untied `embed_out` head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
)


@dataclass(kw_only=True)
class GPTNeoXConfig(ModelConfig):
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 0.25
    use_parallel_residual: bool = True
    attention_bias: bool = True

    hf_aliases: ClassVar[dict[str, str]] = {
        "rotary_pct": "partial_rotary_factor",
        "rotary_emb_base": "rope_theta",
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.query_key_value = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.dense = nn.Linear(hidden, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # [B, T, H*3*D] -> [B, T, H, 3*D] -> [B, H, T, 3*D] -> three [B, H, T, D]
        qkv = self.query_key_value(x).view(batch, seq, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.dense(merge_heads(cached_attend(q, k, v, cache, self.layer_idx, start_pos)))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    """x + attn(ln1(x)) + mlp(ln2(x)) with the parallel residual, else the usual two steps."""

    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), rope, cache, start_pos)
        if self.parallel:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.rotary_emb = RotaryEmbedding(rotary_dim, config.rope_theta, config.rope_scaling)


class GPTNeoXForCausalLM(CausalLM):
    config_class = GPTNeoXConfig
    no_split_modules = ("GPTNeoXLayer",)
    # Mask and RoPE buffers older checkpoints saved with the weights.
    ignored_checkpoint_keys = (r"\.attention\.(masked_)?bias$", r"\.rotary_emb\.inv_freq$")
    base_model_prefix = "gpt_neox"

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    def output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def decoder_layers(self) -> nn.ModuleList:
        return self.gpt_neox.layers

    def cache_layout(self) -> list[tuple[int, int]]:
        return [(self.config.num_attention_heads, self.config.head_dim)] * self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        x = self.gpt_neox.embed_in(input_ids)
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=x.device)
        rope = self.gpt_neox.rotary_emb(positions, x.dtype)
        for layer in self.gpt_neox.layers:
            x = layer(x, rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.embed_out(self.gpt_neox.final_layer_norm(x))
