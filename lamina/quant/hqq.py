"""Calibration-free group parameters for int4: HQQ's half-quadratic zero-point optimization.

Half-Quadratic Quantization (Badri & Shaji, 2023; the `hqq` package's `optimize_weights_proximal_legacy`,
its default): with each group's scale fixed at min/max, the zero point is moved to minimize an
l_p (p = 0.7 < 1) norm of the weight error, which tolerates a few large errors to make most small.
At these defaults and a checkpoint's small weights the shrink is mostly zero, and the update then
keeps each group's dequantized mean at its true mean, removing the bias min/max's zero leaves (which
inputs of one sign add up over the group): on SmolLM2 at group size 128, perplexity 18.303 with min/max's zero, 16.918 with HQQ's
(float32 13.096; benchmarks/NOTES.md finding 28).

Each step, with codes q = clamp(round(w * c + zero)) for c = 1 / scale and the dequantized w_r:
    e    = shrink_p(w - w_r, beta)              (the proximal step of the l_p norm: sparse error)
    zero = mean over the group of (q - (w - e) * c)
It stops at `iters` steps or when the layer's mean |w - w_r| stops falling, as `hqq` does; the zero of
the step that stopped it is kept, also as `hqq` does. One difference: `hqq` caps 1 / scale at 2e4 (and
sets it to 1 for a range under 1e-4) to stay within float16; here the range only floors at 1e-6, as
min/max does, so the two agree on every group whose range exceeds 15 / 2e4 = 7.5e-4.

Two implementations of the steps: `kernels/hqq.c` on CPUs with the native kernels (each group's
steps while it is in cache: ~8x the torch steps' speed, and int4 quantizes a layer in 1.4x min/max's
time), and torch steps elsewhere, equal to `hqq`'s to the bit (int4 then takes 5x min/max's time;
`benchmarks/int4_quantize_speed.py`).
"""

from __future__ import annotations

import torch

from lamina.kernels import native

LP_NORM = 0.7
BETA = 10.0
ITERS = 20
LEVELS = 15  # 4-bit codes 0..15
#: Weights per chunk of `hqq_group_params`' work (1 MiB of float32 per buffer).
CHUNK_ELEMENTS = 1 << 18


def shrink_threshold(beta: float, p: float) -> float:
    """An |error| below which the l_p shrink is exactly zero: beta^(-1 / (2 - p)) (0.17 for the
    defaults), less 0.1% so that rounding at the boundary cannot skip a non-zero shrink."""
    return 0.999 * beta ** (-1 / (2 - p))


@torch.no_grad()
def hqq_group_params(
    wg: torch.Tensor, iters: int = ITERS, beta: float = BETA, p: float = LP_NORM
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for wg [..., G] in hqq's convention, w ~= (q - zero) * scale with
    q in [0, 15]; float32 [...] each.

    On a CPU with Lamina's native kernels and G a multiple of 16, the steps run in C (hqq.c: each
    group's steps in cache, the layer read twice; zeros within about an ulp of the torch steps' but
    at rounding ties, ~8x as fast). Elsewhere the torch steps below run, equal to `hqq`'s to the bit:
    the same float operations in the same order.
    """
    shape, width = wg.shape[:-1], wg.shape[-1]
    flat = wg.reshape(-1, width)  # [..., G] -> [M, G]
    if not len(flat):  # a layer without rows
        return torch.empty(shape), torch.empty(shape)
    rows = max(1, min(len(flat), CHUNK_ELEMENTS // width))
    spans = [(start, min(start + rows, len(flat))) for start in range(0, len(flat), rows)]
    lo = torch.cat([flat[a:b].float().amin(dim=-1, keepdim=True) for a, b in spans])  # [M, 1]
    hi = torch.cat([flat[a:b].float().amax(dim=-1, keepdim=True) for a, b in spans])
    inverse = LEVELS / (hi - lo).clamp(min=1e-6)  # hqq clamps this at 2e4 for fp16: equal above 7.5e-4
    zero = -lo * inverse
    no_shrink_below = shrink_threshold(beta, p)
    if flat.device.type == "cpu" and width % 16 == 0 and native.library() is not None:
        native.hqq_zeros(flat.float().contiguous(), inverse, zero, iters, beta, p, no_shrink_below)
    else:
        _torch_steps(flat, spans, inverse, zero, iters, beta, p, no_shrink_below)
    return (1.0 / inverse).reshape(shape), zero.reshape(shape)


def _torch_steps(
    flat: torch.Tensor,
    spans: list[tuple[int, int]],
    inverse: torch.Tensor,
    zero: torch.Tensor,
    iters: int,
    beta: float,
    p: float,
    no_shrink_below: float,
) -> None:
    """The steps on flat [M, G] in torch, updating zero [M, 1] in place.

    The weight is worked through in `spans` of rows (about CHUNK_ELEMENTS weights each), each step
    over every span, so the temporaries stay small next to a large layer and in cache. (The stopping
    test sums the spans' errors, where `hqq` takes one mean: a step whose error ties the last to
    float32's precision may stop one step apart.) The shrink costs a `pow` per weight but is exactly
    zero while every |error| is below beta^(-1 / (2 - p)) (0.17 for the defaults; an int4 error is at
    most half a step, so most layers never reach it): then it is skipped.
    """
    rows = spans[0][1]
    buffers = [torch.empty(rows, flat.shape[1], dtype=torch.float32, device=flat.device) for _ in range(3)]
    best = float("inf")
    for _ in range(iters):
        total = 0.0
        for a, b in spans:
            work = [buffer[: b - a] for buffer in buffers]
            zero[a:b], error_sum = _step(
                flat[a:b].float(), inverse[a:b], zero[a:b], beta, p, no_shrink_below, work
            )
            total += error_sum
        if total / flat.numel() >= best:
            break
        best = total / flat.numel()


def _step(
    w: torch.Tensor,
    inverse: torch.Tensor,
    zero: torch.Tensor,
    beta: float,
    p: float,
    no_shrink_below: float,
    buffers: list[torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """One HQQ step over w [m, G] (inverse, zero [m, 1]): (the new zero [m, 1], the sum of |w - w_r|)."""
    q, error, work = buffers
    torch.mul(w, inverse, out=q).add_(zero).round_().clamp_(0, LEVELS)
    torch.sub(q, zero, out=error).div_(inverse)  # the dequantized weight
    torch.sub(w, error, out=error)  # w - w_r
    torch.abs(error, out=work)
    error_sum = work.sum().item()
    if work.max().item() >= no_shrink_below:  # work <- (w - shrink_lp(error)) / scale
        work.sub_(work.pow(p - 1).mul_(1.0 / beta)).clamp_min_(0.0).mul_(torch.sign(error))
        torch.sub(w, work, out=work).mul_(inverse)
    else:  # the shrink is all zeros: w - 0 is w
        torch.mul(w, inverse, out=work)
    return -work.sub_(q).mean(dim=-1, keepdim=True), error_sum  # mean(q - (w - e) / scale)
