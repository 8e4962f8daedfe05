"""Perplexity of a model over a text, with a fixed context length and stride (sliding window).

Each window sees up to `context` tokens and is scored only on the tokens the previous window did not
score, so every token after the first is predicted once (with stride == context, each window's first
token is skipped), with at least `context - stride` tokens of
left context (except near the start). exp(mean negative log-likelihood) over those tokens.

The default text is the English documentation that ships with CPython (`pydoc_data.topics.topics`),
so the number is reproducible offline; any UTF-8 text file can be used instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lamina.engine.generate import NON_FINITE
from lamina.errors import CheckpointError, InvalidArgumentError

DEFAULT_CONTEXT = 512
DEFAULT_STRIDE = 256


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored (predicted)
    nll: float  # mean negative log-likelihood, nats per token


def default_text() -> str:
    """CPython's bundled English documentation topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """A non-empty UTF-8 text file, or an `InvalidArgumentError` saying what is wrong with it."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(
            f"text file {p} does not exist; pass an existing UTF-8 text file"
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(
            f"text file {p} is not UTF-8 ({exc.reason} at byte {exc.start}); pass a UTF-8 text file"
        ) from None
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read text file {p} ({exc.strerror or exc}); pass a readable UTF-8 text file"
        ) from None
    if not text.strip():
        raise InvalidArgumentError(f"text file {p} is empty; give it some text")
    return text


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_ids: Sequence[int],
    context: int = DEFAULT_CONTEXT,
    stride: int = DEFAULT_STRIDE,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` (input_ids [1, T] -> logits [1, T, V]) over `token_ids`.

    `progress(scored, total)` is called after each window.
    """
    if not 0 < stride <= context:
        raise InvalidArgumentError(f"stride must be in 1..context ({context}), got {stride}")
    if len(token_ids) < 2:
        raise InvalidArgumentError(f"perplexity needs at least 2 tokens, the text has {len(token_ids)}")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    device = next(model.parameters()).device
    total_nll, scored, prev_end = 0.0, 0, 1  # position 0 has no prediction
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end].to(device)[None]  # [1, W]
        logits = model(window)[0, :-1].float()  # [W-1, V] predictions of window[1:]
        targets = window[0, 1:]
        # Predictions of positions < prev_end were scored already; with stride == context the window's
        # first token has no left context and goes unscored.
        first = max(prev_end - begin - 1, 0)
        nll = torch.nn.functional.cross_entropy(logits[first:], targets[first:], reduction="sum")
        window_nll = float(nll)
        if not math.isfinite(window_nll):
            raise CheckpointError(NON_FINITE)
        total_nll += window_nll
        scored += end - 1 - begin - first
        prev_end = end
        if progress is not None:
            progress(scored, len(ids) - 1)
        if end == len(ids):
            break
    mean = total_nll / scored
    return PerplexityResult(float(torch.tensor(mean).exp()), scored, mean)
