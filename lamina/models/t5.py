"""T5 / T0 / Flan-T5 (T5ForConditionalGeneration): an encoder-decoder with relative position biases.

The encoder reads the prompt once (`encode`); the decoder then produces tokens one at a time
(`decode`), keeping its own keys/values in a KV cache and attending to the encoder's output
through keys/values projected once per prompt (`cross_attention_memory`). Attention is unscaled
and positions enter only as a learned bias per head and relative-distance bucket, computed by the
first block of each stack and shared by the rest. HF names: `shared`, `encoder.block.N.layer.0.SelfAttention.q`,
`decoder.block.N.layer.1.EncDecAttention.k`, `layer.K.DenseReluDense.wi(_0/_1)/wo`, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import LayerCache, RMSNorm, activation, merge_heads, split_heads

CrossMemory = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: encoder keys, values [B, H, S, D]


@dataclass(kw_only=True)
class T5Config(ModelConfig):
    num_heads: int
    d_kv: int
    d_ff: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = True
    # Original T5 scales the decoder output by d_model**-0.5 before a tied head; T5 v1.1 / Flan-T5
    # do not. transformers >= 5 writes the flag; older configs imply it by `tie_word_embeddings`.
    scale_decoder_outputs: bool | None = None

    hf_aliases: ClassVar[dict[str, str]] = {"d_model": "hidden_size", "num_layers": "num_hidden_layers"}

    def __post_init__(self) -> None:
        self.num_decoder_layers = self.num_decoder_layers or self.num_hidden_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id or 0

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        name = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each (key - query) distance: exact for small ones, logarithmic up to max_distance."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    large = (
        exact
        + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    large = torch.clamp(large, max=buckets - 1)
    return bucket + torch.where(relative < exact, relative, large)


class T5Attention(nn.Module):
    """Unscaled multi-head attention; the first block of a stack also owns the position-bias table."""

    def __init__(self, config: T5Config, has_bias: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.hidden_size, inner, bias=False)
        self.k = nn.Linear(config.hidden_size, inner, bias=False)
        self.v = nn.Linear(config.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, config.hidden_size, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d_model] -> keys, values [B, H, S, D]."""
        return split_heads(self.k(x), self.heads, self.head_dim), split_heads(
            self.v(x), self.heads, self.head_dim
        )

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Queries from x [B, T, d_model] over k/v [B, H, L, D], plus bias [1, H, T, L] -> [B, T, d_model]."""
        q = split_heads(self.q(x), self.heads, self.head_dim)
        return self.o(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) blocks and final norm."""

    def __init__(self, config: T5Config, decoder: bool) -> None:
        super().__init__()
        self.config, self.is_decoder = config, decoder
        count = config.num_decoder_layers if decoder else config.num_hidden_layers
        self.block = nn.ModuleList(T5Block(config, decoder, has_bias=i == 0) for i in range(count))
        self.final_layer_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def position_bias(self, start: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
        """Bias [1, H, T, L] for queries at start.. over keys 0..L-1 (the decoder's is -inf above the diagonal)."""
        q_pos = torch.arange(start, start + queries, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(keys, device=device)[None, :]  # [1, L]
        buckets = relative_position_bucket(
            k_pos - q_pos,
            bidirectional=not self.is_decoder,
            buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1)[None]  # [T, L, H] -> [1, H, T, L]
        if self.is_decoder:
            bias = bias.masked_fill(k_pos > q_pos, float("-inf"))
        return bias


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_bias)
        self.layer_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_bias=False)
        self.layer_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class T5DenseActDense(nn.Module):
    """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) for the gated variants (T5 v1.1, Flan-T5)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.gated
        if self.gated:
            self.wi_0 = nn.Linear(config.hidden_size, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.hidden_size, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.hidden_size, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.hidden_size, bias=False)
        self.act = activation(config.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only) and feed-forward, each pre-normed and residual."""

    def __init__(self, config: T5Config, decoder: bool, has_bias: bool) -> None:
        super().__init__()
        parts: list[nn.Module] = [T5LayerSelfAttention(config, has_bias)]
        if decoder:
            parts.append(T5LayerCrossAttention(config))
        parts.append(T5LayerFF(config))
        self.layer = nn.ModuleList(parts)

    def encode(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn = self.layer[0]
        normed = attn.layer_norm(x)
        x = x + attn.SelfAttention.attend(normed, *attn.SelfAttention.project_kv(normed), bias)
        return self.layer[-1](x)

    def decode(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor],
        layer_idx: int,
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        attn, cross = self.layer[0], self.layer[1]
        normed = attn.layer_norm(x)
        k, v = attn.SelfAttention.project_kv(normed)
        if cache is not None:
            k, v = cache.update(layer_idx, start_pos, k, v)
        x = x + attn.SelfAttention.attend(normed, k, v, bias)
        x = x + cross.EncDecAttention.attend(cross.layer_norm(x), *memory, None)
        return self.layer[-1](x)


class T5ForConditionalGeneration(CausalLM):
    """Encoder-decoder: `encode` the prompt, `cross_attention_memory` once, then `decode` token by token."""

    config_class = T5Config
    is_encoder_decoder = True
    no_split_modules = ("T5Block",)
    # Copies of `shared` some checkpoints store, and a bias table the decoder's cross-attention never uses.
    ignored_checkpoint_keys = (
        r"^(encoder|decoder)\.embed_tokens\.weight$",
        r"EncDecAttention\.relative_attention_bias\.weight$",
    )
    base_model_prefix = ""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.shared

    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder.block

    def cache_layout(self) -> list[tuple[int, int]]:
        """(heads, head_dim) of each decoder layer's self-attention cache."""
        return [(self.config.num_heads, self.config.d_kv)] * self.config.num_decoder_layers

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, S] -> encoder states [B, S, d_model]."""
        x = self.shared(input_ids)
        bias = self.encoder.position_bias(0, input_ids.shape[1], input_ids.shape[1], x.device)
        for block in self.encoder.block:
            x = block.encode(x, bias)
        return self.encoder.final_layer_norm(x)

    def cross_attention_memory(self, encoded: torch.Tensor) -> CrossMemory:
        """Each decoder layer's keys/values of the encoder states, computed once per prompt."""
        return [block.layer[1].EncDecAttention.project_kv(encoded) for block in self.decoder.block]

    def decode(
        self,
        decoder_ids: torch.Tensor,
        memory: CrossMemory,
        cache: LayerCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Decoder ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        x = self.shared(decoder_ids)
        keys = start_pos + decoder_ids.shape[1]
        bias = self.decoder.position_bias(start_pos, decoder_ids.shape[1], keys, x.device)
        for i, block in enumerate(self.decoder.block):
            x = block.decode(x, bias, memory[i], i, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        x = self.decoder.final_layer_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.hidden_size**-0.5
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, S] and decoder ids [B, T] -> logits [B, T, V], without a cache."""
        return self.decode(decoder_ids, self.cross_attention_memory(self.encode(input_ids)))
