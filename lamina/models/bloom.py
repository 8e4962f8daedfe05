"""BLOOM: ALiBi instead of positions, a LayerNorm right after the embeddings, fused qkv per head.

HF names: `transformer.word_embeddings(_layernorm)`, `transformer.h.N.self_attention.query_key_value`
(rows of head h are [q_h | k_h | v_h]), `self_attention.dense`, `mlp.dense_h_to_4h` /
`mlp.dense_4h_to_h`, `transformer.ln_f`, and a head tied to the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import ALiBi, LayerCache, activation, cached_attend, merge_heads


@dataclass(kw_only=True)
class BloomConfig(ModelConfig):
    num_attention_heads: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True

    hf_aliases: ClassVar[dict[str, str]] = {
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_embed": "hidden_size",
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.alibi = ALiBi(self.heads)

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        # [B, T, H*3*D] -> [B, T, H, 3, D] -> three [B, H, T, D]
        qkv = self.query_key_value(x).view(batch, seq, self.heads, 3, self.head_dim).transpose(1, 2)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        out = cached_attend(q, k, v, cache, self.layer_idx, start_pos, alibi=self.alibi)
        return self.dense(merge_heads(out))


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.act = activation("gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """Pre-norm attention and MLP; the residual is the normed input when the config says so."""

    def __init__(self, config: BloomConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        self.residual_post_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        normed = self.input_layernorm(x)
        x = (normed if self.residual_post_norm else x) + self.self_attention(normed, cache, start_pos)
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_post_norm else x) + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class BloomForCausalLM(CausalLM):
    config_class = BloomConfig
    no_split_modules = ("BloomBlock",)
    base_model_prefix = "transformer"

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

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
        x = self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))
        for block in self.transformer.h:
            x = block(x, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))
