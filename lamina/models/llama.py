"""The Llama family: Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM and other checkpoints of the same shape.

Parameters are named exactly as in Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...),
so HF checkpoints load by name. Family differences are config fields: Qwen2's q/k/v biases,
Mistral's sliding window, Qwen3's per-head q/k norm, Llama 3's RoPE scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import Attention, GatedMLP, LayerCache, RMSNorm, RotaryEmbedding
from lamina.models.native_layer import NativeLlamaLayer


@dataclass(kw_only=True)
class LlamaConfig(ModelConfig):
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    qkv_bias: bool | None = None  # q/k/v bias without an o bias (Qwen2); defaults to attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True  # Qwen2 writes a window size but switches it off with this flag
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    qk_norm: bool = False  # RMS norm on each query/key head before RoPE (Qwen3)

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer (None: it attends to the whole context)."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and gated MLP, each added to the residual stream."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(
            layer_idx,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.qkv_bias,
            o_bias=config.attention_bias,
            sliding_window=config.window(layer_idx),
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.native: NativeLlamaLayer | None = None  # set by `attach_native_layers` where it applies

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int | torch.Tensor,
    ) -> torch.Tensor:
        if self.native is not None and isinstance(start_pos, int):
            out = self.native.run(x, rope, cache, start_pos)
            if out is not None:
                return out
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaForCausalLM(CausalLM):
    """Token ids in, next-token logits out; optionally reading and writing a KV cache."""

    config_class = LlamaConfig
    no_split_modules = ("LlamaDecoderLayer",)
    # forward = embed -> each decoder layer (x, rope, cache, start_pos) -> head, and accepts a
    # tensor start_pos: what lamina.engine.compiled needs to compile the decode step.
    supports_static_decode = True
    # Names some checkpoints carry that the model computes itself.
    ignored_checkpoint_keys = (r"\.rotary_emb\.inv_freq$",)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def cache_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each layer, for sizing a KV cache."""
        return [(self.config.num_key_value_heads, self.config.head_dim)] * self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int | torch.Tensor = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only).

        `start_pos` may be a 1-element tensor: the static-shape form the compiled decode step uses.
        """
        x, rope = self.embed(input_ids, start_pos)
        for layer in self.model.layers:
            x = layer(x, rope, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def embed(
        self, input_ids: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids [B, T] -> hidden states [B, T, hidden] and the RoPE (cos, sin) every layer takes."""
        x = self.model.embed_tokens(input_ids)
        positions = start_pos + torch.arange(input_ids.shape[1], device=x.device)  # [T]
        return x, self.model.rotary_emb(positions, x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, hidden] -> logits [B, T, V]."""
        return self.lm_head(self.model.norm(x))
