"""Scaled dot-product attention with grouped KV heads, and one decode token over a static cache.

`sdpa` is what every attention path calls: grouped KV heads without copies where torch allows.
`decode_attention` serves the compiled decode step (`lamina.engine.compiled`), whose KV cache has
one static size so the graph never changes shape. Attending over all of it, masked past the
current position, made the step's attention twice as slow on CPU (153 us a layer over a
768-position bucket vs 70 us over the 576 filled positions, benchmarks/NOTES.md): this op reads the
position and attends over the filled prefix only, inside an op the compiler does not look into,
so the graph around it keeps its static shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lamina.kernels import native

# SDPA takes grouped KV heads itself from torch 2.5 (`enable_gqa`); before, KV heads are repeated.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

_ONE_ROW_AT_A_TIME = contextvars.ContextVar("lamina_one_row_at_a_time", default=False)


@contextlib.contextmanager
def decode_order_attention() -> Iterator[None]:
    """Within this block, new tokens continuing a cache attend one query row at a time, each over its
    own prefix, exactly as decoding them one by one would.

    A multi-row SDPA call rounds differently from one-row calls (CPU, float32: up to ~4e-7), which
    can flip an argmax near-tie; speculative decoding's greedy verify pass uses this so its tokens
    are the plain decode's. It costs one attention call per row.
    """
    token = _ONE_ROW_AT_A_TIME.set(True)
    try:
        yield
    finally:
        _ONE_ROW_AT_A_TIME.reset(token)


def one_row_at_a_time() -> bool:
    """Whether `decode_order_attention` is in effect."""
    return _ONE_ROW_AT_A_TIME.get()


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k/v [B, Hkv, L, D] with grouped KV heads, never copying k/v for one token.

    One decode token over 576 cached positions, 30 layers' caches, 2 threads, torch 2.13 CPU, per
    layer: float32 `enable_gqa` 123 us, group folded into query rows 139 us; bfloat16 400 us and
    111 us. So float32 uses `enable_gqa`, other dtypes fold; longer queries take `enable_gqa` too.
    """
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if _SDPA_GQA and (seq > 1 or q.dtype == torch.float32):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    if seq == 1:  # the group's queries share their KV head and the one-row mask
        folded = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, H, 1, D] -> [B, Hkv, group, D]
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
        return out.reshape(batch, heads, 1, dim)  # [B, Hkv, group, D] -> [B, H, 1, D]
    k, v = repeat_kv(k, v, heads // kv_heads)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def repeat_kv(k: torch.Tensor, v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, L, D] -> [B, H, L, D]: each KV head repeated for the `group` query heads sharing it."""
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


@torch.library.custom_op("lamina::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, window: int
) -> torch.Tensor:
    """One query token q [B, H, 1, D] at `position` (a 1-element tensor) over a static cache k/v
    [B, Hkv, L, D] filled up to and including it: attends over positions max(0, p - window + 1)..p
    (the whole prefix when `window` is 0), exactly what the masked full-cache form computes."""
    end = int(position[0]) + 1  # the host read a CUDA graph could not replay: CPU steps only
    if q.dtype == torch.float32 and k.dtype == torch.float32:  # the eager decode step's kernel
        out = native.decode_attention(q.transpose(1, 2), k, v, end - 1, window, q.shape[-1] ** -0.5)
        if out is not None:
            return out.transpose(1, 2).contiguous()  # [B, 1, H, D] -> [B, H, 1, D]
    start = max(0, end - window) if window > 0 else 0
    out = sdpa(q, k[:, :, start:end], v[:, :, start:end])
    return out.clone(memory_format=torch.contiguous_format)  # the layout the fake below promises


@decode_attention.register_fake
def _decode_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, window: int
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
