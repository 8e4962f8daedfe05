"""Fixtures for the quantization tests: seeded random linears and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lamina.models.llama import LlamaConfig, LlamaForCausalLM

TINY = dict(
    architecture="LlamaForCausalLM",
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def random_linear(
    in_features: int = 256, out_features: int = 64, bias: bool = False, seed: int = 0
) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    lin.weight.data.normal_(0, 0.02)
    return lin.requires_grad_(False)


def tiny_config(**overrides: object) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 64), float32, in eval mode."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.1)
    return model.eval().requires_grad_(False)
