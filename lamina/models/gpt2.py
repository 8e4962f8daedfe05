"""GPT-2: learned positions, pre-LayerNorm blocks, fused qkv, tied output head.

HF stores GPT-2's projections as `Conv1D` weights of shape [in, out]; `sanitize` transposes them
at load into the [out, in] nn.Linear layout, so every projection is a plain nn.Linear here (and
quantizes like any other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.models.base import CausalLM
from lamina.models.layers import LayerCache, activation, cached_attend, merge_heads, split_heads

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(kw_only=True)
class GPT2Config(ModelConfig):
    num_attention_heads: int
    intermediate_size: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    hf_aliases: ClassVar[dict[str, str]] = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
        "n_inner": "intermediate_size",
    }

    def __post_init__(self) -> None:
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.heads, self.head_dim = layer_idx, config.num_attention_heads, config.head_dim
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        out = cached_attend(q, k, v, cache, self.layer_idx, start_pos, scale=self.scale)
        return self.c_proj(merge_heads(out))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None, start_pos: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    config_class = GPT2Config
    no_split_modules = ("GPT2Block",)
    # Causal-mask buffers older checkpoints saved with the weights.
    ignored_checkpoint_keys = (r"\.attn\.(masked_)?bias$",)
    base_model_prefix = "transformer"

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def cache_layout(self) -> list[tuple[int, int]]:
        return [(self.config.num_attention_heads, self.config.head_dim)] * self.config.num_hidden_layers

    def sanitize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Conv1D [in, out] weights -> nn.Linear [out, in]."""
        return tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or [B, 1, V] if last_only)."""
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))
