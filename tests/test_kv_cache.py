"""Cached decoding must equal recomputing the whole sequence, whatever the chunking."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.engine.kv_cache import KVCache


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_cached_decode_equals_uncached(tiny_models, family):
    model = LLM.load(tiny_models[family][1], device="cpu").model
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2, max_len=20, dtype=torch.float32)
        # a prompt of 7, a chunk of 5 continuing the cache, then one token at a time
        pieces = [model(ids[:, :7], cache, 0), model(ids[:, 7:12], cache, 7)]
        pieces += [model(ids[:, i : i + 1], cache, i) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_last_only_returns_final_position(tiny_llama_dir):
    model = LLM.load(tiny_llama_dir, device="cpu").model
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])


def test_cache_update_returns_filled_prefix():
    cache = KVCache([(2, 4)], batch=1, max_len=8, dtype=torch.float32, devices=[torch.device("cpu")])
    k1, v1 = torch.ones(1, 2, 3, 4), torch.full((1, 2, 3, 4), 2.0)
    keys, values = cache.update(0, 0, k1, v1)
    assert keys.shape == (1, 2, 3, 4) and torch.equal(values, v1)
    keys, _ = cache.update(0, 3, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert keys.shape == (1, 2, 4, 4) and torch.equal(keys[:, :, :3], k1)
    assert cache.nbytes() == 2 * 1 * 2 * 8 * 4 * 4
