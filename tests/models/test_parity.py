"""Every family against transformers on tiny random checkpoints, through Lamina's loader.

Per family: fp32 logits equal; 20 greedy tokens equal to transformers' `generate`, both with the
KV cache and by recomputing the whole sequence each step; chunked cached prefill equals uncached.
Prompts of 12 tokens outgrow the 8-token sliding windows.
"""

from __future__ import annotations

import pytest
import torch

from lamina.engine.generate import generate_tokens
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty, load_weights
from tests.models.tiny import TINY, VOCAB, save_tiny

FAMILIES = sorted(TINY)


def load_lamina(path) -> torch.nn.Module:
    with open_checkpoint(path) as checkpoint:
        model, _ = build_empty(checkpoint)
        load_weights(model, checkpoint, torch.float32, "cpu")
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(transformers model, Lamina model loaded from its saved checkpoint)."""
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_tiny(request.param, directory)
    return reference, load_lamina(directory)


def test_logits_match_transformers(pair):
    reference, model = pair
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits)


def test_greedy_continuation_matches_transformers_cached_and_uncached(pair):
    reference, model = pair
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference.generate(
            prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 12:].tolist()
        uncached = prompt
        for _ in range(20):
            uncached = torch.cat([uncached, model(uncached)[:, -1:].argmax(-1)], dim=1)
    cached = list(generate_tokens(model, prompt[0].tolist(), 20, SamplingParams(temperature=0)))
    assert cached == expected
    assert uncached[0, 12:].tolist() == expected


def test_chunked_cached_decode_equals_uncached(pair):
    _, model = pair
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2, max_len=20, dtype=torch.float32)
        pieces = [model(ids[:, :7], cache, 0), model(ids[:, 7:12], cache, 7)]
        pieces += [model(ids[:, i : i + 1], cache, i) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
