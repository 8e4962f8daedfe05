"""OPT: learned positions offset by 2, ReLU MLP, LayerNorm before or after each block.

`do_layer_norm_before=False` (OPT-350m) norms after each residual add; `word_embed_proj_dim`
smaller than the hidden size adds `project_in` / `project_out` around the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import LayerCache, activation, cached_attend, merge_heads, split_heads

POSITION_OFFSET = 2  # OPT's position table starts 2 rows in (rows 0-1 were for padding)


@dataclass(kw_only=True)
class OPTConfig(ModelConfig):
    num_attention_heads: int
    ffn_dim: int
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True

    hf_aliases: ClassVar[dict[str, str]] = {"_remove_final_layer_norm": "remove_final_layer_norm"}

    def __post_init__(self) -> None:
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        hidden, bias = config.hidden_size, config.enable_bias
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        q, k, v = (
            split_heads(p(x), self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(merge_heads(cached_attend(q, k, v, cache, self.layer_idx, start_pos)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = nn.Linear(hidden, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = activation(config.activation_function)
        self.norm_before = config.do_layer_norm_before

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        if self.norm_before:
            x = x + self.self_attn(self.self_attn_layer_norm(x), cache, start_pos)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, cache, start_pos))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        hidden, proj = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, proj)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(proj, hidden, bias=False) if proj != hidden else None
        self.project_out = nn.Linear(hidden, proj, bias=False) if proj != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        has_final_norm = config.do_layer_norm_before and not config.remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
            if has_final_norm
            else None
        )


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(CausalLM):
    config_class = OPTConfig
    no_split_modules = ("OPTDecoderLayer",)

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.decoder.layers

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
        decoder = self.model.decoder
        x = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            x = decoder.project_in(x)
        start = start_pos + POSITION_OFFSET
        x = x + decoder.embed_positions(torch.arange(start, start + input_ids.shape[1], device=x.device))
        for layer in decoder.layers:
            x = layer(x, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)
        return self.lm_head(x)
