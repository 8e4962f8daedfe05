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
from lamina.models.layers import RotaryEmbedding
from tests.models.tiny import LONGROPE_ORIGINAL_CONTEXT, TINY, VOCAB, save_tiny

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


def test_longrope_past_the_original_context_uses_the_long_factors(tmp_path):
    """A prompt past original_max_position_embeddings rotates by the long factors, as in transformers."""
    reference = save_tiny("phi3_longrope", tmp_path)
    model = load_lamina(tmp_path)
    ids = torch.randint(
        0, VOCAB, (1, LONGROPE_ORIGINAL_CONTEXT + 16), generator=torch.Generator().manual_seed(6)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits)
        assert not torch.allclose(model(ids)[:, :8], model(ids[:, :8]), atol=1e-3)  # short factors differ


def test_longrope_generation_past_the_original_context_matches_transformers(tmp_path):
    """A prompt past the original context: prefill and decoding use the long factors, as in transformers."""
    reference = save_tiny("phi3_longrope", tmp_path)
    model = load_lamina(tmp_path)
    prompt = torch.randint(
        3, VOCAB, (1, LONGROPE_ORIGINAL_CONTEXT + 6), generator=torch.Generator().manual_seed(8)
    )
    with torch.no_grad():
        expected = reference.generate(
            prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt.shape[1] :].tolist()
    assert list(generate_tokens(model, prompt[0].tolist(), 10, SamplingParams(temperature=0))) == expected


def test_longrope_with_a_cache_picks_factors_by_the_cache_length():
    """Every key in a cache longer than the original context is rotated by the long factors, even
    those of early prompt chunks, so a chunked prefill never mixes the two sets."""
    scaling = dict(
        TINY["phi3_longrope"][1]["rope_parameters"], original_max_position_embeddings=64, factor=4.0
    )
    rotary = RotaryEmbedding(12, 10000.0, scaling)
    early, late = torch.arange(8), torch.arange(60, 80)
    long_early = rotary(early, torch.float32, seq_len=80)
    torch.testing.assert_close(
        long_early[0], rotary(torch.arange(80), torch.float32)[0][:8]
    )  # uncached: long
    torch.testing.assert_close(rotary(late, torch.float32, seq_len=80)[0], rotary(late, torch.float32)[0])
    assert not torch.allclose(long_early[0], rotary(early, torch.float32, seq_len=64)[0])  # short within 64
