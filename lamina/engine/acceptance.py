"""Which draft tokens the target keeps: pure functions on token ids and probability tensors.

Speculative decoding (Leviathan et al. 2023, Chen et al. 2023) lets a small draft model propose K
tokens and the target model score all of them in one forward pass. The rules here decide how many
proposals survive and which token follows them, so that the output is distributed exactly as if
the target had sampled every token itself:

- greedy: keep the proposals that equal the target's argmax; the target's argmax follows.
- sampling: keep proposal x with probability min(1, p(x) / q(x)); at the first rejection draw from
  normalize(max(0, p - q)); when all K survive, draw a bonus token from the target's next p.

p and q are the target's and the draft's distributions after the same `process_logits`.
"""

from __future__ import annotations

import torch


def greedy_accept(draft_ids: torch.Tensor, target_ids: torch.Tensor) -> tuple[int, int]:
    """(accepted count n, next token): draft_ids [K] against the target's argmax ids [K + 1].

    The next token is the target's own choice after the n accepted ones: a correction when n < K,
    a bonus token when n == K.
    """
    n = _leading_true(draft_ids == target_ids[:-1])
    return n, int(target_ids[n].item())


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)) over the last dimension: where to draw from after a rejection.

    A rejection only happens where q(x) > p(x), so p - q has positive mass there; should rounding
    leave none, p itself is returned (its excess over q is then below float precision).
    """
    excess = (p - q).clamp(min=0)
    total = excess.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, excess / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def speculative_accept(
    draft_ids: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(accepted count n, next token) by the speculative-sampling rule.

    draft_ids [K] were drawn from the draft's q [K, V]; p [K + 1, V] is the target's distribution
    at each proposal's position and one past the last. Uniform draws u [K] accept proposal i when
    u_i * q_i(x_i) < p_i(x_i), i.e. with probability min(1, p_i(x_i) / q_i(x_i)).
    """
    k = draft_ids.shape[0]
    rows = torch.arange(k, device=draft_ids.device)  # [K]
    p_draft, q_draft = p[rows, draft_ids], q[rows, draft_ids]  # [K] each
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)  # [K]
    n = _leading_true(u * q_draft < p_draft)
    follow = p[n] if n == k else residual_distribution(p[n], q[n])  # [V]
    return n, int(torch.multinomial(follow, 1, generator=generator).item())


def _leading_true(flags: torch.Tensor) -> int:
    """How many entries of the bool vector `flags` [K] are True before the first False."""
    return int(flags.long().cumprod(dim=0).sum().item())
