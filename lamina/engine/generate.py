"""The generation loop: prefill the prompt, then decode one token at a time, as a Python generator.

`generate_tokens` yields token ids as they are sampled, so callers stream, stop early or count as
they like; `GenerationStats` records the timings users ask about (time to first token, decode rate).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams, sample
from lamina.errors import CheckpointError, InvalidArgumentError

if TYPE_CHECKING:
    from lamina.engine.compiled import CompiledDecoder

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first new token out (prefill + one sample)
    decode_s: float = 0.0  # time spent producing the tokens after the first
    compile_s: float = 0.0  # warm-up of a compiled decode step before the prompt was read (0 if none)
    drafted: int = 0  # speculative decoding: tokens the draft model proposed
    accepted: int = 0  # ... and how many of them the target kept
    context: int = 0  # the context window the run had (0: unknown)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target accepted (0 without a draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        text = (
            f"prompt tokens: {self.prompt_tokens}, new tokens: {self.new_tokens}, "
            f"time to first token: {self.ttft_s:.3f} s, decode: {self.decode_tokens_per_s:.1f} tokens/s"
        )
        if self.drafted:
            text += f", draft accepted: {self.accepted}/{self.drafted} ({self.acceptance_rate:.0%})"
        if self.context and self.prompt_tokens + self.new_tokens >= self.context:
            text += f"; stopped at the model's context window ({self.context} tokens)"
        return text


def input_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the token embeddings (a quantized embedding names its output dtype)."""
    embed = model.input_embeddings()
    table = next(embed.buffers(), None) if not isinstance(embed, nn.Embedding) else embed.weight
    return table.device, getattr(embed, "output_dtype", table.dtype)


def check_prompt_fits(prompt_len: int, context: int) -> None:
    """Reject prompts that leave no room for a new token in the model's context window."""
    if prompt_len == 0:
        raise InvalidArgumentError("the prompt is empty; give some text to continue")
    if prompt_len >= context:
        raise InvalidArgumentError(
            f"the prompt is {prompt_len} tokens but the model's context window is {context}; shorten the prompt"
        )


NON_FINITE = (
    "the model produced NaN or infinite logits: its weights or config are damaged; re-download the "
    "model (or re-run `lamina quantize`)"
)


def require_finite(logits: torch.Tensor) -> None:
    """A run's first logits must be finite: NaN or inf come from damaged weights or config values, and
    sampling from them would print empty or garbage text as if all were well (one check a run)."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(NON_FINITE)


def prefill(model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run prompt `ids` [B, T] (positions 0..T-1) into `cache` in chunks; logits of the last position [B, 1, V].

    Chunks of PREFILL_CHUNK tokens keep batched matmuls big while bounding activation memory.
    """
    for chunk_start in range(0, ids.shape[1], PREFILL_CHUNK):
        chunk = ids[:, chunk_start : chunk_start + PREFILL_CHUNK]
        logits = model(chunk, cache=cache, start_pos=chunk_start, last_only=True)
    return logits


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | None = None,
    stats: GenerationStats | None = None,
    decoder: CompiledDecoder | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids; stops after yielding a token in `stop_ids`.

    The prompt runs eagerly in chunks (big batched matmuls); each new token runs through
    `decoder`'s compiled step when one is given, else through the eager model.
    """
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max new tokens must be >= 1, got {max_new_tokens}")
    context = model.config.max_position_embeddings
    check_prompt_fits(len(prompt_ids), context)
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens, stats.context = len(prompt_ids), 0, context

    device, act_dtype = input_device_dtype(model)
    total = len(prompt_ids) + max_new_tokens
    if decoder is not None:
        cache = decoder.cache(batch=1, length=total, dtype=act_dtype)  # compiles on a new shape
        stats.compile_s = decoder.compile_s
        position = torch.zeros(1, dtype=torch.long, device=device)  # the step's static inputs
        last = torch.zeros(1, 1, dtype=torch.long, device=device)
    else:
        cache = KVCache.for_model(model, batch=1, max_len=total, dtype=act_dtype)
    tokens = torch.empty(1, total, dtype=torch.long, device=device)  # prompt + generated, for penalties
    tokens[0, : len(prompt_ids)] = torch.tensor(list(prompt_ids), dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    start = time.perf_counter()
    length = len(prompt_ids)
    logits = prefill(model, tokens[:, :length], cache)
    require_finite(logits[:, -1])
    for step in range(max_new_tokens):
        next_id = sample(logits[:, -1], params, tokens[:, :length], generator)
        tokens[:, length] = next_id
        token = int(next_id.item())  # the one host sync per token
        length += 1
        stats.new_tokens += 1
        now = time.perf_counter()
        if step == 0:
            stats.ttft_s = now - start
            decode_start = now
        else:
            stats.decode_s = now - decode_start
        yield token
        if token in stop_ids or step == max_new_tokens - 1:
            return
        if decoder is not None:
            last.copy_(next_id.view(1, 1))
            position.fill_(length - 1)
            logits = decoder.step(last, position, cache)[:, None]  # [B, V] -> [B, 1, V]
        else:
            logits = model(tokens[:, length - 1 : length], cache=cache, start_pos=length - 1)
