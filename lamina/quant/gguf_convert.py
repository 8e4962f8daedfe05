"""More GGUF types -> the native kernel's blocks (`blockq.py`), so files made of them run without being
expanded to float: Q5_0 / Q5_1, the K-quants Q2_K to Q6_K (llama.cpp's Q*_K_* files are made of
these, Q8_0, and Q4_0 / Q5_0 where a width is not a multiple of 256), and the non-linear IQ4_NL /
IQ4_XS, the grid types and MXFP4 / NVFP4. `gguf.quants` is the reference for every layout.

Q5_0 / Q5_1 (blocks of 32: fp16 d [and m], 32 high bits, 16 bytes of nibbles; w = d (q - 16) or
d q + m) -> the same blocks, 5-bit codes as a nibble plus a bit plane (blockq.c): exact, same size.

K-quants, super-blocks of 256 weights along in_features:
- Q4_K: fp16 d and dmin, eight 6-bit (scale, min) pairs packed in 12 bytes, 128 bytes of nibbles;
  sub-block j (32 weights): w = d * sc_j * q - dmin * m_j, q in [0, 15].
  -> Q4_1 blocks: the codes exactly; d * sc_j and -dmin * m_j (17 significant bits) rounded to
  the kernel's fp16 (relative error <= 2^-11 of each sub-block's scale and min).
- Q5_K: Q4_K's layout plus 32 bytes of high bits (bit j of byte i: sub-block j, weight i), q in
  [0, 31] -> Q5_1 blocks (5-bit codes), codes exact, scales as for Q4_K.
- Q2_K: sixteen bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit codes, fp16 d and dmin; sub-block
  j (16 weights): w = d * sc_j * q - dmin * m_j, q in [0, 3]. -> "Q2_K" blocks: 2-bit codes, d * sc_j
  and -dmin * m_j per 16 weights in fp16: codes exact, scales rounded (relative <= 2^-11).
- Q3_K: 32 bytes of high bits, 64 bytes of 2-bit low parts, sixteen 6-bit scales packed in 12 bytes,
  fp16 d; sub-block j (16 weights): w = d * (sc_j - 32) * (q - 4), q in [0, 7] (the high bit set
  means +4). -> "Q3_K" blocks: 3-bit codes (2-bit tile + a bit plane), offset 4, d * (sc_j - 32) per
  16 weights in fp16: codes exact, scales rounded (relative <= 2^-11).
- Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen int8 scales, fp16 d;
  sub-block j (16 weights): w = d * sc_j * (q - 32), q in [0, 63].
  -> "Q6_K" blocks: 6-bit codes q (offset 32), a scale d * sc_j per 16 weights (the kernel's
  `scale_block` 16): codes exact, scales rounded to fp16 (relative error <= 2^-11).

Non-linear 4-bit (w = d * kvalues[q], `gguf.quants.IQ4_NL.kvalues`: 16 integers in [-127, 113]):
- IQ4_NL (blocks of 32: fp16 d, 16 bytes of nibbles as Q4_0's) -> the same blocks; the kernel reads
  the code book through its table (blockq.c): exact.
- IQ4_XS (super-blocks of 256: fp16 d, 6-bit scales ls_j per 32 split in 2 + 4 bits, nibbles as
  IQ4_NL's per 32) -> IQ4_NL blocks with d * (ls_j - 32) rounded to fp16 (relative <= 2^-11).
- MXFP4 (OCP microscaling, gpt-oss's experts; blocks of 32: an E8M0 exponent e, 16 bytes of nibbles
  as Q4_0's; w = 2^(e - 128) * kvalues[q], the E2M1 values doubled: 0, +-1, 2, 3, 4, 6, 8, 12) ->
  "MXFP4" blocks, a code book read as IQ4_NL's, d = 2^(e - 128) in fp16: exact for e in [104, 143],
  which holds any weight of a trained model (beyond it the tensor stays float, see below).
- NVFP4 (super-blocks of 64: four UE4M3 scales, one per 16 weights, then 8 bytes of nibbles per 16,
  low nibbles first; w = ue4m3 / 2 * kvalues[q], MXFP4's values) -> "NVFP4" blocks, the same code
  book with a scale per 16 weights: exact (a UE4M3 value has 4 significant bits and lies in
  [2^-9, 448], which fp16 holds). NVIDIA's per-tensor float32 scale is not part of the GGML type.

Grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, TQ1_0, TQ2_0: code words from
lattices, no nibble layout) are read through their values as `gguf.quants` dequantizes them. Each
grid's values are whole numbers of a step (`GRID_BOOKS`: IQ3_S odd 1..15, IQ2 8/25/43, IQ1 eighths
1/7/9, ..., with signs), so a block whose largest weight is g steps has step s = max|w| / g and every
weight a whole number of steps: per block (32 weights, or 16 for IQ1_M, IQ2_XS and IQ2_S, which scale
each 16), the candidate g that reproduces the block gives s. The signed numbers form a code book of at
most 16 values (`GRID_BOOKS`): 4-bit codes into it, read through the kernel's table as IQ4_NL's are,
d = s in fp16: codes exact, d relative <= 2^-11 (2^-25 absolute for a step below fp16's normal range).

Scales fp16 cannot hold (beyond 65504, or nonzero ones it would flush to zero, below 2^-25) make
`converted_blocks` return None: the loader keeps such a tensor float.

Memory, bits a weight as stored -> here: Q5_0 5.5 -> 5.5, Q5_1 6 -> 6, IQ4_NL 4.5 -> 4.5, Q4_K 4.5 -> 5
and Q5_K 5.5 -> 6 (fp16 d and m per 32 weights instead of 6-bit ones), IQ4_XS 4.25 -> 4.5, Q2_K
2.63 -> 4 (fp16 d and m per 16), Q3_K 3.44 -> 4, Q6_K 6.56 -> 7, IQ1_S / IQ2_XXS / IQ3_XXS / IQ3_S /
TQ 1.56-3.44 -> 4.5, IQ1_M / IQ2_XS / IQ2_S 1.75-2.5 -> 5, MXFP4 4.25 -> 4.5, NVFP4 4.5 -> 5; float32 would be 32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from lamina.errors import UnsupportedModelError
from lamina.quant.blocks import fp16_holds

#: Grid types -> their weights in whole steps of the block's scale (`gguf.quants`' grids, signed): the
#: code book of their 4-bit codes here.
GRID_BOOKS = {
    "IQ1_S": (-9, -7, -1, 1, 7, 9),  # (grid -1/0/1 + delta +-1/8) in eighths
    "IQ1_M": (-9, -7, -1, 1, 7, 9),
    "IQ2_XXS": (-43, -25, -8, 8, 25, 43),
    "IQ2_XS": (-43, -25, -8, 8, 25, 43),
    "IQ2_S": (-43, -25, -8, 8, 25, 43),
    "IQ3_XXS": (-62, -52, -44, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 44, 52, 62),
    "IQ3_S": (-15, -13, -11, -9, -7, -5, -3, -1, 1, 3, 5, 7, 9, 11, 13, 15),
    "TQ1_0": (-1, 0, 1),
    "TQ2_0": (-1, 0, 1, 2),
}
#: GGML types converted here -> the block format they become (`blockq.FORMATS`).
CONVERTED = {
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q4_K": "Q4_1",
    "Q5_K": "Q5_1",
    "Q6_K": "Q6_K",
    "Q3_K": "Q3_K",
    "Q2_K": "Q2_K",
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    "MXFP4": "MXFP4",
    "NVFP4": "NVFP4",
    **{t: t for t in GRID_BOOKS},
}
#: Grid types whose blocks have a scale per 16 weights (the rest one per 32).
GRID_SCALED_BY_16 = ("IQ1_M", "IQ2_XS", "IQ2_S")


def quant_blocks(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    """Raw bytes of a [N, K] tensor -> uint8 [N * K / block, bytes per block] (block: 32 or 256)."""
    n, k = shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    if ggml_type not in CONVERTED or k % block:
        raise UnsupportedModelError(
            f"GGML type {ggml_type} with {k} columns cannot stay quantized here; supported: "
            f"{sorted(CONVERTED)} with columns a multiple of their block size"
        )
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(n * k // block, size)


def _fp16(field: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian fp16 fields -> float32 [..., 1]."""
    return field.copy().view(np.float16).astype(np.float32)


def q5_blocks(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q5_0 / Q5_1 bytes of a [N, K] tensor -> codes uint8 [N, K] in [0, 31], d (and m) float32 [N, K/32]."""
    n, k = shape
    b = quant_blocks(data, ggml_type, shape)  # [B, 22 or 24]: d, [m,] qh (32 bits), qs[16]
    head = 2 if ggml_type == "Q5_0" else 4
    qh = b[:, head : head + 4].copy().view(np.uint32)  # [B, 1]
    # [B, 32]: bit j of qh is element j's fifth bit
    high = ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)
    qs = b[:, head + 4 :]  # [B, 16]: element j low nibble, j + 16 high
    codes = _nibbles32(qs) | (high << np.uint8(4))  # [B, 32]
    out = {
        "codes": torch.from_numpy(codes.reshape(n, k)),
        "d": torch.from_numpy(_fp16(b[:, 0:2]).reshape(n, k // 32)),
    }
    if ggml_type == "Q5_1":
        out["m"] = torch.from_numpy(_fp16(b[:, 2:4]).reshape(n, k // 32))
    return out


def _k_scales(sb: np.ndarray, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q4_K / Q5_K super-blocks [S, bytes] -> each 32-weight sub-block's d * sc and -dmin * m, [N, K/32]."""
    sc, mins = quants.Q4_K.get_scale_min(sb[:, 4:16])  # [S, 8] each, 6-bit
    d = _fp16(sb[:, 0:2]) * sc.astype(np.float32)  # [S, 8]
    m = -_fp16(sb[:, 2:4]) * mins.astype(np.float32)  # [S, 8]
    return {"d": torch.from_numpy(d.reshape(n, k // 32)), "m": torch.from_numpy(m.reshape(n, k // 32))}


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes of Q4_K / Q5_K nibbles [S, 128] -> uint8 [S, 8, 32]: sub-blocks 2i and 2i + 1 are the low
    and high nibbles of bytes 32i..32i + 31."""
    pairs = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)  # [S, 4, 2, 32]
    return (pairs & np.uint8(15)).reshape(-1, 8, 32)


def q4_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q4_K bytes of a [N, K] tensor -> Q4_1 blocks: codes uint8 [N, K], d and m float32 [N, K/32]."""
    n, k = shape
    sb = quant_blocks(data, "Q4_K", shape)  # [S, 144]: d, dmin, scales[12], qs[128]
    codes = _k_low_nibbles(sb[:, 16:])
    return {"codes": torch.from_numpy(codes.reshape(n, k)), **_k_scales(sb, n, k)}


def q5_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q5_K bytes of a [N, K] tensor -> Q5_1 blocks: codes uint8 [N, K] in [0, 31], d and m [N, K/32]."""
    n, k = shape
    sb = quant_blocks(data, "Q5_K", shape)  # [S, 176]: d, dmin, scales[12], qh[32], qs[128]
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (sb[:, 16:48].reshape(-1, 1, 32) >> shifts) & np.uint8(1)  # [S, 8, 32]: bit j for sub-block j
    codes = _k_low_nibbles(sb[:, 48:]) | (high << np.uint8(4))
    return {"codes": torch.from_numpy(codes.reshape(n, k)), **_k_scales(sb, n, k)}


def q2_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q2_K bytes of a [N, K] tensor -> codes uint8 [N, K] in [0, 3], d and m float32 [N, K/16]."""
    n, k = shape
    sb = quant_blocks(data, "Q2_K", shape)  # [S, 84]: scales[16] (sc low, m high nibble), qs[64], d, dmin
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (sb[:, 16:80].reshape(-1, 2, 1, 32) >> shifts) & np.uint8(3)  # [S, half, 4, 32]: 256 in order
    d = _fp16(sb[:, 80:82]) * (sb[:, :16] & np.uint8(15)).astype(np.float32)  # [S, 16]
    m = -_fp16(sb[:, 82:84]) * (sb[:, :16] >> np.uint8(4)).astype(np.float32)  # [S, 16]
    return {
        "codes": torch.from_numpy(codes.reshape(n, k)),
        "d": torch.from_numpy(d.reshape(n, k // 16)),
        "m": torch.from_numpy(m.reshape(n, k // 16)),
    }


def q3_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q3_K bytes of a [N, K] tensor -> codes uint8 [N, K] in [0, 7] (offset 4), d float32 [N, K/16]."""
    n, k = shape
    sb = quant_blocks(data, "Q3_K", shape)  # [S, 110]: hmask[32], qs[64], scales[12], d
    shifts2 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    low = (sb[:, 32:96].reshape(-1, 2, 1, 32) >> shifts2) & np.uint8(3)  # [S, half, 4, 32]: 256 in order
    high = (sb[:, :32].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(
        1
    )  # [S, 8, 32]
    codes = low.reshape(-1, 256) | (high.reshape(-1, 256) << np.uint8(2))  # [S, 256]
    packed = sb[:, 96:108]
    low_scales = (packed[:, :8, None] >> np.array([0, 4], dtype=np.uint8)).transpose(0, 2, 1) & np.uint8(15)
    high_scales = (packed[:, 8:12, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)).transpose(
        0, 2, 1
    ) & np.uint8(3)
    scales = low_scales.reshape(-1, 16).astype(np.int32) | (high_scales.reshape(-1, 16).astype(np.int32) << 4)
    d = _fp16(sb[:, 108:110]) * (scales - 32).astype(np.float32)  # [S, 16]
    return {"codes": torch.from_numpy(codes.reshape(n, k)), "d": torch.from_numpy(d.reshape(n, k // 16))}


def q6_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q6_K bytes of a [N, K] tensor -> codes uint8 [N, K] in [0, 63] (offset 32), d float32 [N, K/16]."""
    n, k = shape
    sb = quant_blocks(data, "Q6_K", shape)  # [S, 210]: ql[128], qh[64], scales[16] int8, d
    ql = sb[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(15)).reshape(-1, 2, 128)  # [S, half, 128]: low 4 bits of 128 weights each
    qh = sb[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(-1, 2, 128)  # [S, half, 128]: high 2 bits
    codes = ql | (qh << np.uint8(4))  # [S, 2, 128] -> 256 weights in order
    d = _fp16(sb[:, 208:210]) * sb[:, 192:208].view(np.int8).astype(np.float32)  # [S, 16]
    return {"codes": torch.from_numpy(codes.reshape(n, k)), "d": torch.from_numpy(d.reshape(n, k // 16))}


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32 weights [B, 16] -> codes uint8 [B, 32]: element j low nibble of byte j, j + 16 high."""
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1)


def iq4_nl_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """IQ4_NL bytes of a [N, K] tensor -> codes uint8 [N, K] (code book indices), d float32 [N, K/32]."""
    n, k = shape
    b = quant_blocks(data, "IQ4_NL", shape)  # [B, 18]: d, qs[16]
    return {
        "codes": torch.from_numpy(_nibbles32(b[:, 2:]).reshape(n, k)),
        "d": torch.from_numpy(_fp16(b[:, 0:2]).reshape(n, k // 32)),
    }


def iq4_xs_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """IQ4_XS bytes of a [N, K] tensor -> IQ4_NL blocks: codes uint8 [N, K], d float32 [N, K/32]."""
    n, k = shape
    sb = quant_blocks(data, "IQ4_XS", shape)  # [S, 136]: d, scales_h (uint16), scales_l[4], qs[128]
    high = (sb[:, 2:4].copy().view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)) & np.uint16(
        3
    )  # [S, 8]
    low = (sb[:, 4:8, None] >> np.array([0, 4], dtype=np.uint8)) & np.uint8(15)  # [S, 4, 2]: sub-block 2i + h
    scales = low.reshape(-1, 8).astype(np.int32) | (high.astype(np.int32) << 4)  # [S, 8] in [0, 63]
    d = _fp16(sb[:, 0:2]) * (scales - 32).astype(np.float32)  # [S, 8]
    codes = _nibbles32(sb[:, 8:].reshape(-1, 16))  # [S * 8, 32]
    return {"codes": torch.from_numpy(codes.reshape(n, k)), "d": torch.from_numpy(d.reshape(n, k // 32))}


def mxfp4_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """MXFP4 bytes of a [N, K] tensor -> codes uint8 [N, K] (indices into `quants.MXFP4.kvalues`), d
    float32 [N, K/32] (2^(e - 128), as gguf's `e8m0_to_fp32_half`)."""
    n, k = shape
    b = quant_blocks(data, "MXFP4", shape)  # [B, 17]: e, qs[16]
    d = quants.MXFP4.e8m0_to_fp32_half(b[:, 0].copy())  # [B]
    return {
        "codes": torch.from_numpy(_nibbles32(b[:, 1:]).reshape(n, k)),
        "d": torch.from_numpy(d.reshape(n, k // 32)),
    }


def nvfp4_blocks(data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """NVFP4 bytes of a [N, K] tensor -> codes uint8 [N, K] (indices into `quants.NVFP4.kvalues`), d
    float32 [N, K/16] (UE4M3 / 2, as gguf's `ue4m3_to_fp32`)."""
    n, k = shape
    sb = quant_blocks(data, "NVFP4", shape)  # [S, 36]: 4 UE4M3 scales, qs[32]
    d = quants.NVFP4.ue4m3_to_fp32(sb[:, :4]).astype(np.float32)  # [S, 4]
    qs = sb[:, 4:].reshape(-1, 4, 8)  # [S, sub-block, 8 bytes]: weight j low nibble, j + 8 high
    codes = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # [S, 4, 16]
    return {"codes": torch.from_numpy(codes.reshape(n, k)), "d": torch.from_numpy(d.reshape(n, k // 16))}


def grid_blocks(data: np.ndarray, shape: tuple[int, int], ggml_type: str) -> dict[str, torch.Tensor]:
    """A grid type's values -> 4-bit codes into its `GRID_BOOKS` book, uint8 [N, K], and d per 32
    weights (per 16 for `GRID_SCALED_BY_16`) in fp16 values: the step found per block (see above)."""
    n, k = shape
    quant_blocks(data, ggml_type, shape)  # the type and width checks
    scale_block = 16 if ggml_type in GRID_SCALED_BY_16 else 32
    values = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[ggml_type]))
    values = values.reshape(n, k // scale_block, scale_block)  # [N * K] -> [N, blocks, weights]
    amax = values.abs().amax(-1, keepdim=True)  # [N, blocks, 1]
    book = torch.tensor(GRID_BOOKS[ggml_type], dtype=torch.float32)
    best = None
    for magnitude in sorted({abs(v) for v in GRID_BOOKS[ggml_type] if v}):  # the largest weight's candidates
        step = amax / magnitude
        q = torch.where(step > 0, values / step, 0).round()
        error = (q * step - values).abs().amax(-1, keepdim=True)
        if best is None:
            best = error, step, q
        else:
            better = error < best[0]
            best = tuple(
                torch.where(better, new, old) for new, old in zip((error, step, q), best, strict=True)
            )
    _, step, q = best
    top = int(book.abs().max())
    nearest = (
        (torch.arange(-top, top + 1.0)[:, None] - book).abs().argmin(-1)
    )  # [2 top + 1]: q + top -> entry
    codes = nearest[(q.clamp(-top, top) + top).long()]  # the book's entry (exact for grid values)
    return {"codes": codes.to(torch.uint8).reshape(n, k), "d": step[..., 0].half().float()}


_CONVERTERS: dict[str, Callable[[np.ndarray, tuple[int, int]], dict[str, torch.Tensor]]] = {
    "Q5_0": functools.partial(q5_blocks, ggml_type="Q5_0"),
    "Q5_1": functools.partial(q5_blocks, ggml_type="Q5_1"),
    "Q4_K": q4_k_blocks,
    "Q5_K": q5_k_blocks,
    "Q6_K": q6_k_blocks,
    "Q3_K": q3_k_blocks,
    "Q2_K": q2_k_blocks,
    "IQ4_NL": iq4_nl_blocks,
    "IQ4_XS": iq4_xs_blocks,
    "MXFP4": mxfp4_blocks,
    "NVFP4": nvfp4_blocks,
    **{t: functools.partial(grid_blocks, ggml_type=t) for t in GRID_BOOKS},
}


def converted_blocks(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int]
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """A tensor of a `CONVERTED` type as (block format, its blocks) for `BlockQuantLinear.from_blocks`,
    or None when a scale is beyond fp16's range (too large, or nonzero and flushed to zero). Raises
    `UnsupportedModelError` for other types or widths that are not a multiple of the type's block."""
    quant_blocks(data, ggml_type, shape)  # checks the type and shape
    blocks = _CONVERTERS[ggml_type](data, shape=shape)
    if not all(fp16_holds(blocks[name]) for name in ("d", "m") if name in blocks):
        return None
    return CONVERTED[ggml_type], blocks
