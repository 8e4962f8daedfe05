"""Prompt lookup: draft tokens by copying what followed the latest earlier occurrence of the last
few tokens, in the prompt or in the output so far (Saxena 2023; transformers' `prompt_lookup_num_tokens`,
vLLM's n-gram speculator).

No draft model: the proposals cost nothing to make, so speculative decoding pays whenever the text
repeats itself, which outputs grounded in their prompt (summaries, answers quoting a document, code
edits) and a small model's own loops do often. When the last tokens have not occurred before, no
token is proposed and the round is a plain decode step.

The proposals are deterministic, so as a distribution q is one-hot: the speculative-sampling rule
then keeps a proposal x with probability p(x) and, when it does not, draws from p without x, which
keeps the model's distribution exactly (greedy: the model's own tokens).
"""

from __future__ import annotations

import torch

from lamina.engine.sampling import SamplingParams

MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a verify pass
MAX_NGRAM = 3
#: Tokens proposed per round unless set: on free text most proposals miss, and a verify pass over
#: K + 1 positions costs more than one step (benchmarks/NOTES.md, finding 15).
DEFAULT_LOOKUP_K = 2


class NgramIndex:
    """Where each n-gram (MIN_NGRAM <= n <= MAX_NGRAM) of a growing token sequence last ended.

    `propose` looks up the sequence's own last n tokens (longest n first) among the n-grams that end
    before the sequence does, and returns the tokens that followed that occurrence.
    """

    def __init__(self, min_n: int = MIN_NGRAM, max_n: int = MAX_NGRAM) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # n-gram -> end (exclusive) of its latest occurrence
        self._latest_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions <= this are in _latest_end

    def extend(self, tokens: list[int]) -> None:
        """Append accepted tokens."""
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the sequence's last n tokens."""
        end = len(self.tokens)
        for stop in range(self._indexed + 1, end):  # index n-grams ending before the sequence does
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                self._latest_end[tuple(self.tokens[stop - n : stop])] = stop
        self._indexed = max(self._indexed, end - 1)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            found = self._latest_end.get(tuple(self.tokens[end - n :]))
            if found is not None:
                return self.tokens[found : min(found + k, end)]
        return []


class PromptLookupDrafter:
    """The speculative loop's drafter (see `speculative.Drafter`) for prompt lookup."""

    context: int | None = None  # no model: no context window of its own

    def __init__(self, min_n: int = MIN_NGRAM, max_n: int = MAX_NGRAM) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.index = NgramIndex(min_n, max_n)

    def start(self, tokens: torch.Tensor, length: int) -> None:
        self.index = NgramIndex(self.min_n, self.max_n)
        self.index.extend(tokens[0, :length].tolist())

    def propose(
        self,
        tokens: torch.Tensor,
        length: int,
        n_draft: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, None]:
        """Write up to `n_draft` proposals into tokens[0, length:]; their q is one-hot (None)."""
        self.index.extend(tokens[0, len(self.index.tokens) : length].tolist())
        proposal = self.index.propose(n_draft) if n_draft else []
        tokens[0, length : length + len(proposal)] = torch.tensor(proposal, dtype=torch.long)
        return len(proposal), None

    def accepted(self, length: int, n_accepted: int) -> None:
        """Nothing to roll back: the index only ever holds accepted tokens."""
