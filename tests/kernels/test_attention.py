"""The native decode attention against float64 attention, row by row over each row's prefix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamina.kernels import native


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int, scale: float):
    """q [B, T, H, D] at positions start.. over k/v [B, Hkv, L, D], float64, one row at a time."""
    rows, heads = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    out = []
    for t in range(rows):
        p = start + t
        lo = max(0, p - window + 1) if window else 0
        kk = k[:, :, lo : p + 1].double().repeat_interleave(group, 1)  # [B, H, n, D]
        vv = v[:, :, lo : p + 1].double().repeat_interleave(group, 1)
        qq = q[:, t].double()[:, :, None]  # [B, H, 1, D]
        out.append(F.scaled_dot_product_attention(qq, kk, vv, scale=scale)[:, :, 0])  # [B, H, D]
    return torch.stack(out, dim=1)  # [B, T, H, D]


CASES = [  # batch, rows, heads, kv heads, head dim, start, window, cache length
    (1, 1, 9, 3, 64, 575, 0, 700),  # SmolLM2's shape, one decode step
    (1, 5, 9, 3, 64, 250, 0, 300),  # a verify pass whose rows straddle a 256-position chunk
    (2, 3, 8, 8, 128, 300, 0, 400),  # batch 2, no grouping
    (1, 4, 9, 3, 64, 600, 100, 700),  # sliding window
    (1, 1, 32, 8, 80, 10, 0, 64),  # head dim not a multiple of 64
    (1, 3, 4, 2, 256, 0, 0, 8),  # a fresh prompt, widest head
    (1, 2, 4, 1, 16, 1023, 0, 1100),  # 4 chunks, one KV head
]


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_attention(native_lib, case) -> None:
    batch, rows, heads, kv_heads, dim, start, window, length = case
    g = torch.Generator().manual_seed(start)
    qkv = torch.randn(batch, rows, heads + 2 * kv_heads, dim, generator=g)
    q = qkv[:, :, :heads]  # a strided view, as attention gets it from the fused projection
    k = torch.randn(batch, kv_heads, length, dim, generator=g) * 2
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    k[:, :, start + rows :] = float("nan")  # past the new rows: must never be read
    out = native.decode_attention(q, k, v, start, window, dim**-0.5)
    assert out.shape == (batch, rows, heads, dim) and out.is_contiguous()
    assert (out.double() - reference(q, k, v, start, window, dim**-0.5)).abs().max() < 2e-6


def test_rows_are_bit_identical_alone_or_together_and_across_thread_counts(native_lib) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 9, 64, generator=g)
    k, v = torch.randn(2, 1, 3, 600, 64, generator=g)
    together = native.decode_attention(q, k, v, 500, 0, 0.125)
    alone = torch.cat(
        [native.decode_attention(q[:, t : t + 1], k, v, 500 + t, 0, 0.125) for t in range(6)], dim=1
    )
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.decode_attention(q, k, v, 500, 0, 0.125), together)
    finally:
        torch.set_num_threads(threads)


def test_keys_and_values_of_one_fused_output_attend_as_separate_tensors(native_lib) -> None:
    """A prompt without a cache: k and v are views of the fused q/k/v output with different strides.
    The kernel still runs (so fused and separate projections attend alike) and equals contiguous k/v."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 9 + 2 * 3, 64, generator=g)  # [B, T, H + 2 Hkv, D]
    qk = qkv[:, :, :12] * 1.0  # the rotated q and k heads, a new tensor as after RoPE: [B, T, H + Hkv, D]
    q, k = qk[:, :, :9], qk[:, :, 9:].transpose(1, 2)  # k [B, Hkv, T, D]
    v = qkv[:, :, 12:].transpose(1, 2)  # [B, Hkv, T, D], strides unlike k's
    assert k.stride() != v.stride()
    out = native.decode_attention(q, k, v, 0, 0, 0.125)
    assert out is not None
    assert torch.equal(out, native.decode_attention(q, k.contiguous(), v.contiguous(), 0, 0, 0.125))
    assert (out.double() - reference(q, k, v, 0, 0, 0.125)).abs().max() < 2e-6


@pytest.mark.parametrize("dim, heads, kv_heads", [(72, 4, 4), (512, 2, 2), (64, 34, 2)])
def test_shapes_outside_the_kernel_are_declined(native_lib, dim: int, heads: int, kv_heads: int) -> None:
    q = torch.randn(1, 1, heads, dim)
    k = v = torch.randn(1, kv_heads, 8, dim)
    assert native.decode_attention(q, k, v, 3, 0, 0.1) is None
