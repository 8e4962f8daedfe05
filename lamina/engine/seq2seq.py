"""Generation for encoder-decoder models (T5): encode the prompt once, then decode with a KV cache.

The decoder starts from the model's `decoder_start_token_id`; the encoder's keys/values for every
decoder layer are projected once and reused for each new token. Yields ids like `generate_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lamina.engine.generate import GenerationStats
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams, sample
from lamina.errors import InvalidArgumentError


@torch.inference_mode()
def generate_seq2seq_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled decoder ids; stops after yielding a token in `stop_ids`."""
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise InvalidArgumentError("the prompt is empty; give some text for the encoder to read")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.new_tokens = len(prompt_ids), 0
    embed = model.input_embeddings().weight
    device = embed.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    start = time.perf_counter()
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    memory = model.cross_attention_memory(model.encode(prompt))
    cache = KVCache.for_model(model, batch=1, max_len=max_new_tokens, dtype=embed.dtype)
    tokens = torch.empty(1, max_new_tokens + 1, dtype=torch.long, device=device)  # start token + generated
    tokens[0, 0] = model.config.decoder_start_token_id
    for step in range(max_new_tokens):
        logits = model.decode(tokens[:, step : step + 1], memory, cache, step)
        next_id = sample(logits[:, -1], params, tokens[:, 1 : step + 1], generator)
        tokens[:, step + 1] = next_id
        token = int(next_id.item())
        stats.new_tokens += 1
        now = time.perf_counter()
        if step == 0:
            stats.ttft_s = now - start
            decode_start = now
        else:
            stats.decode_s = now - decode_start
        yield token
        if token in stop_ids:
            return
