"""Speculative decoding: a small draft model proposes K tokens, the target verifies them in one pass.

Decoding one stream on a CPU or GPU is bound by reading the weights, so the target scoring K + 1
positions costs about what one position does. Each round the draft proposes K tokens one at a
time, the target runs once over [last accepted token, K proposals], `acceptance.py` keeps a prefix
of the proposals and supplies the token after it (a correction, or a bonus when all K survive),
so every round yields 1..K+1 tokens distributed exactly as the target's own sampling would.

Both models keep their own `KVCache`. Rolling back rejected proposals needs no copying: a cache
holds positions 0..n-1 valid when the next forward starts at n, and entries past that are
overwritten. The target's cache holds every accepted token but the newest (which the next verify
pass starts with, as a plain decode step would); the draft's holds the accepted tokens it has
processed, which after a round where all K survive lags two behind (its last proposal and the
bonus token), so the next round feeds it both at once.

What proposes is a `Drafter`: a draft model (`ModelDrafter`) or prompt lookup
(`prompt_lookup.PromptLookupDrafter`, no model). A drafter may propose fewer than K tokens, or
none: the round is then a plain decode step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from lamina.engine.acceptance import greedy_accept, speculative_accept
from lamina.engine.generate import (
    GenerationStats,
    check_prompt_fits,
    input_device_dtype,
    prefill,
    require_finite,
)
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams, process_logits, sample
from lamina.errors import InvalidArgumentError
from lamina.models.sdpa import decode_order_attention

DEFAULT_K = 4  # tokens drafted per round; see benchmarks/NOTES.md finding 13 for the trade-off


@torch.inference_mode()
def speculative_tokens(
    target: nn.Module,
    draft: nn.Module | Drafter,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    k: int,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids as `generate_tokens(target, ...)` would, up to `k` drafted at a
    time by `draft` (a draft model, or any `Drafter`).

    Greedy output equals the target's own greedy output; sampled output has the target's
    distribution. Stops right after yielding a token in `stop_ids`, or at the smaller of the two
    models' context windows. Both models run eagerly.
    """
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if k < 1:
        raise InvalidArgumentError(f"speculative k must be >= 1, got {k}")
    drafter = ModelDrafter(draft) if isinstance(draft, nn.Module) else draft
    context = target.config.max_position_embeddings
    context = min(context, drafter.context or context)
    check_prompt_fits(len(prompt_ids), context)
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens, stats.drafted, stats.accepted = len(prompt_ids), 0, 0, 0
    stats.context = context

    device, target_dtype = input_device_dtype(target)
    total = len(prompt_ids) + max_new_tokens
    target_cache = KVCache.for_model(target, batch=1, max_len=total, dtype=target_dtype)
    tokens = torch.empty(1, total, dtype=torch.long, device=device)  # prompt + generated
    tokens[0, : len(prompt_ids)] = torch.tensor(list(prompt_ids), dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    start = time.perf_counter()
    length = len(prompt_ids)  # tokens so far; the target's cache holds all but the newest
    logits = prefill(target, tokens[:, :length], target_cache)
    require_finite(logits[:, -1])
    drafter.start(tokens, length)
    new = [int(sample(logits[:, -1], params, tokens[:, :length], generator).item())]
    while True:
        for token in new:  # the round's tokens, checked one by one against the stop ids and budget
            tokens[0, length] = token
            length += 1
            stats.new_tokens += 1
            now = time.perf_counter()
            if stats.new_tokens == 1:
                stats.ttft_s = now - start
                decode_start = now
            else:
                stats.decode_s = now - decode_start
            yield token
            if token in stop_ids or stats.new_tokens == max_new_tokens:
                return
        # Draft at most what the budget can still take: the round adds one token beyond the drafts.
        n_draft, q = drafter.propose(
            tokens, length, min(k, max_new_tokens - stats.new_tokens - 1), params, generator
        )
        n_accepted, follow = _verify(target, target_cache, tokens, length, n_draft, q, params, generator)
        drafter.accepted(length, n_accepted)
        stats.drafted += n_draft
        stats.accepted += n_accepted
        new = [*tokens[0, length : length + n_accepted].tolist(), follow]


class Drafter(Protocol):
    """What proposes tokens for the target to verify."""

    context: int | None  # the longest sequence it can draft for, None = no limit

    def start(self, tokens: torch.Tensor, length: int) -> None:
        """Take in the prompt tokens[0, :length]."""

    def propose(
        self,
        tokens: torch.Tensor,
        length: int,
        n_draft: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, torch.Tensor | None]:
        """Write at most `n_draft` proposals into tokens[0, length:]; return how many, and their
        distributions q [count, V] when sampling (None: greedy, or deterministic proposals, q one-hot)."""

    def accepted(self, length: int, n_accepted: int) -> None:
        """The target kept `n_accepted` of the proposals that started at `length`."""


class ModelDrafter:
    """A draft model with its own KV cache: proposals are its own samples, one forward each."""

    def __init__(self, draft: nn.Module) -> None:
        self.draft = draft
        self.context = draft.config.max_position_embeddings
        self.cache: KVCache | None = None  # sized in `start`, to the generation's token buffer
        self.cached = 0  # positions the draft's cache holds

    def start(self, tokens: torch.Tensor, length: int) -> None:
        dtype = input_device_dtype(self.draft)[1]
        self.cache = KVCache.for_model(self.draft, batch=1, max_len=tokens.shape[1], dtype=dtype)
        prefill(self.draft, tokens[:, :length], self.cache)
        self.cached = length

    def propose(
        self,
        tokens: torch.Tensor,
        length: int,
        n_draft: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, torch.Tensor | None]:
        """The draft first catches up on tokens[cached:length] (the newest token, or two of them after
        a round where all proposals were accepted), then samples `n_draft` tokens."""
        q = []
        feed_from = self.cached
        for i in range(n_draft):
            logits = self.draft(
                tokens[:, feed_from : length + i], cache=self.cache, start_pos=feed_from, last_only=True
            )
            feed_from = length + i
            scores = process_logits(logits[:, -1], params, tokens[:, : length + i])  # [1, V]
            if params.greedy:
                tokens[:, length + i] = scores.argmax(dim=-1)
                continue
            probs = scores.softmax(dim=-1)  # [1, V]
            tokens[:, length + i] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            q.append(probs)
        if n_draft:
            self.cached = length + n_draft - 1  # all but its last proposal
        return n_draft, torch.cat(q) if q else None

    def accepted(self, length: int, n_accepted: int) -> None:
        self.cached = min(self.cached, length + n_accepted)  # drop what followed a rejection


def _verify(
    target: nn.Module,
    cache: KVCache,
    tokens: torch.Tensor,
    length: int,
    n_draft: int,
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Score [newest token, proposals] with the target in one pass: (accepted count, next token).

    Greedy decoding attends one row at a time (`decode_order_attention`), so the target's logits
    round as in plain decoding and the tokens are its own wherever its other layers are row-exact
    (the int4/int8 kernels are; float32 matmuls over several rows round differently, rarely enough
    to flip a token: benchmarks/NOTES.md, finding 15).
    """
    ids = tokens[:, length - 1 : length + n_draft]
    with decode_order_attention() if params.greedy else contextlib.nullcontext():
        logits = target(ids, cache=cache, start_pos=length - 1)
    # Row i is the target's view after tokens[:length + i], penalized by exactly those tokens.
    scores = torch.cat(
        [process_logits(logits[:, i], params, tokens[:, : length + i]) for i in range(n_draft + 1)]
    )  # [n_draft + 1, V]
    draft_ids = tokens[0, length : length + n_draft]  # [n_draft]
    if params.greedy:
        return greedy_accept(draft_ids, scores.argmax(dim=-1))
    p = scores.softmax(dim=-1)  # [n_draft + 1, V]
    if q is None:  # deterministic proposals (or none): q is one-hot, [n_draft, V]
        q = torch.nn.functional.one_hot(draft_ids, p.shape[-1]).to(p.dtype)
    return speculative_accept(draft_ids, q, p, generator)
