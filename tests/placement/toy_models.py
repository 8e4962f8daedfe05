"""Toy modules with known byte sizes for placement tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A residual MLP block: 2 * (d*d + d) + 2 * d parameters."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Toy(nn.Module):
    """Embedding, `n` blocks and a head tied to the embedding."""

    no_split_modules = ("Block",)

    def __init__(self, d: int = 32, n: int = 4, vocab: int = 50, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def block_bytes(d: int) -> int:
    return (2 * (d * d + d) + 2 * d) * 4
