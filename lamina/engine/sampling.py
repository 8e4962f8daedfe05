"""Choosing the next token from logits: pure functions, kept out of the model.

`SamplingParams` validates user input once; `process_logits` applies the user's settings (repetition
penalty, temperature, top-k, top-p) and `sample` picks token ids from the result. Speculative
decoding compares target and draft distributions after the same `process_logits`, so the two paths
cannot drift apart. Greedy decoding is temperature 0.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from lamina.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidArgumentError(f"{name.replace('_', ' ')} must be a number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidArgumentError(f"top-k must be an integer (0 = no limit), got {self.top_k!r}")
        if not self.temperature >= 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise InvalidArgumentError(
                f"repetition penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_seed(seed: object) -> None:
    """A seed must be None or an integer torch's generators take: in [-2^63, 2^64)."""
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise InvalidArgumentError(f"seed must be an integer in [-2^63, 2^64), got {seed!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL paper; same rule as transformers).

    logits [B, V]; seen [B, N] token ids. Positive logits are divided by `penalty`, negative multiplied.
    """
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row [B, V]; the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches p; the top token always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits [B, V] after the repetition penalty and, unless greedy, temperature, top-k, top-p.

    `seen` [B, N] are the ids so far (for the penalty). Softmax of the result is the distribution
    `sample` draws from; greedy decoding takes its argmax.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    return filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
