"""The Gemma family: Gemma, Gemma 2 and Gemma 3 (text), parameters named as in Hugging Face.

All three are Llama-shaped decoders with Gemma's traits: embeddings scaled by sqrt(hidden),
(1 + w) RMSNorms, a GeGLU MLP. Gemma 2 adds a norm after attention and around the MLP
("sandwich" norms), tanh soft-capping of attention scores and final logits, a score scale of
query_pre_attn_scalar**-0.5 and sliding-window layers. Gemma 3 drops the soft-caps, adds per-head
q/k norms and gives sliding layers their own RoPE base. Each trait is a config field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import Attention, GatedMLP, LayerCache, RMSNorm, RotaryEmbedding, soft_cap

SLIDING = "sliding_attention"


@dataclass(kw_only=True)
class GemmaConfig(ModelConfig):
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_local_base_freq: float | None = None  # Gemma 3: RoPE base of the sliding layers
    rope_parameters: dict[str, Any] | None = None  # Gemma 3 (transformers >= 5): per layer type
    hidden_act: str | None = None  # Gemma 1 spells it this way ...
    hidden_activation: str | None = None  # ... Gemma 2 and 3 this way
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    sliding_window_pattern: int | None = None  # older Gemma 3 configs: every Nth layer is global
    sandwich_norms: bool = False  # Gemma 2/3: post-attention and pre/post-feed-forward norms
    qk_norm: bool = False  # Gemma 3

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.hidden_activation = self.hidden_activation or self.hidden_act or "gelu_pytorch_tanh"
        if self.layer_types is None:
            pattern = self.sliding_window_pattern
            if pattern:  # Gemma 3's legacy spelling: layer i is global when (i + 1) % pattern == 0
                self.layer_types = [
                    SLIDING if (i + 1) % pattern else "full_attention" for i in range(self.num_hidden_layers)
                ]
            else:
                self.layer_types = ["full_attention"] * self.num_hidden_layers
        nested = self.rope_parameters or {}
        if SLIDING in nested:  # {"sliding_attention": {...}, "full_attention": {...}}
            local, full = nested[SLIDING], nested.get("full_attention") or {}
            self.rope_local_base_freq = local.get("rope_theta", self.rope_local_base_freq)
            self.rope_theta = full.get("rope_theta", self.rope_theta)
            scaling = {k: v for k, v in full.items() if k != "rope_theta"}
            self.rope_scaling = scaling if scaling.get("rope_type", "default") != "default" else None

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    def local_rope(self, layer_idx: int) -> bool:
        """Whether a layer uses the local RoPE base (Gemma 3's sliding layers)."""
        return self.rope_local_base_freq is not None and self.layer_types[layer_idx] == SLIDING


class GemmaDecoderLayer(nn.Module):
    """Pre-norm attention and GeGLU MLP; with sandwich norms, their outputs are normed too."""

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        scale = config.query_pre_attn_scalar**-0.5 if config.query_pre_attn_scalar else None
        self.self_attn = Attention(
            layer_idx,
            hidden,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            sliding_window=config.window(layer_idx),
            scale=scale,
            softcap=config.attn_logit_softcapping,
            qk_norm_eps=eps if config.qk_norm else None,
            norm_offset=1.0,
        )
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, cache, start_pos)
        if not self.sandwich:  # Gemma 1: post_attention_layernorm is the MLP's pre-norm
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        if config.rope_local_base_freq is not None:
            self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.rope_local_base_freq)


class GemmaForCausalLM(CausalLM):
    """Gemma 1/2/3 text models: ids [B, T] -> logits [B, T, V]."""

    config_class = GemmaConfig
    no_split_modules = ("GemmaDecoderLayer",)
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$", r"\.embed_scale$")

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
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
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=x.device)
        rope = self.model.rotary_emb(positions, x.dtype)
        local = self.model.rotary_emb_local(positions, x.dtype) if self.config.rope_local_base_freq else rope
        for i, layer in enumerate(self.model.layers):
            x = layer(x, local if self.config.local_rope(i) else rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return soft_cap(self.lm_head(self.model.norm(x)), self.config.final_logit_softcapping)
