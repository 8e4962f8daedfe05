"""Sampling: pure functions on logits, and validation of user-supplied values."""

from __future__ import annotations

import pytest
import torch

from lamina.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sample,
)
from lamina.errors import InvalidArgumentError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    out = filter_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 4.0 and out[0, 2] == 3.0


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_p(probs.log(), 0.8)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    # the top token always survives, even when it alone exceeds p
    assert torch.isfinite(filter_top_p(probs.log(), 0.1)[0, 0])


def test_repetition_penalty_matches_transformers_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), logits.clone())
    torch.testing.assert_close(out, expected)


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=5)
    draws = [sample(logits, params, generator=torch.Generator().manual_seed(7)).item() for _ in range(2)]
    assert draws[0] == draws[1]
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    gen = torch.Generator().manual_seed(8)
    assert {sample(logits, params, generator=gen).item() for _ in range(200)} <= allowed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_p": 1.01}, "top-p"),
        ({"top_k": -1}, "top-k"),
        ({"repetition_penalty": 0.0}, "repetition penalty"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        SamplingParams(**kwargs)
