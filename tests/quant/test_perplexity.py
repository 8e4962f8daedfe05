"""Sliding-window perplexity: every token scored once, matches a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lamina.engine.perplexity import default_text, perplexity, read_text
from lamina.errors import InvalidArgumentError


@pytest.mark.parametrize(("context", "stride"), [(64, 64), (64, 16), (200, 100)])
def test_windows_score_each_token_once(tiny_model: nn.Module, context: int, stride: int) -> None:
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(tiny_model, ids, context=context, stride=stride)
    skipped = len(range(context, 149, stride)) if stride == context else 0  # unscored window starts
    assert result.tokens == 149 - skipped
    if context >= 150:  # one window: same as the plain full-sequence loss
        logits = tiny_model(torch.tensor([ids]))[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
        assert result.perplexity == pytest.approx(float(nll.exp()), rel=1e-5)


def test_default_text_is_english_docs() -> None:
    text = default_text()
    assert len(text) > 100_000 and "assignment" in text


def test_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidArgumentError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(InvalidArgumentError, match="stride"):
        perplexity(nn.Linear(1, 1), [1, 2, 3], context=8, stride=9)
