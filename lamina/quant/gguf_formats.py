"""GGUF Q4_0 / Q4_1 / Q8_0 blocks -> Lamina's int4 / int8 runtime layouts, without a float detour.

Block formats (32 weights per block, row-major along in_features; `gguf.quants` is the reference):
- Q4_0: fp16 d, 16 bytes of nibbles; w = d * (q - 8).
- Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m.
- Q8_0: fp16 d, 32 int8; w = d * q.
Nibble order in a block: byte j holds element j (low nibble) and element j + 16 (high nibble).

Where the conversion is exact and where it is not:
- Q4_0 / Q4_1 -> `Int4Linear` (group size 32, w = (q - 8) * s + z): the 4-bit codes are copied
  exactly. s = d and z = 0 (Q4_0) or z = m + 8 d (Q4_1) are stored in bfloat16, as the packed int4
  kernels require; bf16 keeps 8 significand bits to fp16's 11, so s is exact only when d's lowest 3
  significand bits are zero (relative error <= 2^-8 otherwise), and z adds one bf16 rounding of
  m + 8 d (absolute error <= 2^-8 |m + 8 d|). Dequantized values therefore equal gguf's exactly
  when d and m + 8 d are bf16-representable, and within those bounds otherwise.
- Q8_0 -> `Int8Linear` / `Int8Embedding` (one scale per output row): the int8 kernel has no per-block
  scales, so the blocks are dequantized row by row (exactly, fp16 d x int8 q) and re-quantized per
  row; exact when all blocks of a row share d, otherwise adds up to s_row / 2 per weight, where
  s_row = row absmax / 127. (Computing Q8_0 exactly with the int8 kernel takes one kernel call per
  32-column block: measured ~4x slower than one per-row call on the 49152x576 output head.)
Other GGML types (K-quants, Q5_x, ...) are not converted here; the loader dequantizes them to float.
"""

from __future__ import annotations

import numpy as np
import torch

from lamina.errors import UnsupportedModelError
from lamina.loading.gguf_layout import RowOrder
from lamina.quant.int4 import Int4Linear, make_scales_and_zeros
from lamina.quant.int8 import ROW_CHUNK, Int8Embedding, Int8Linear, quantize_per_channel

BLOCK = 32
#: GGML types this module converts, with their bytes per 32-weight block.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def raw_blocks(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    """Raw bytes of a [N, K] tensor -> uint8 [N, K/32, bytes per block]."""
    n, k = shape
    if ggml_type not in BLOCK_BYTES:
        raise UnsupportedModelError(
            f"GGML type {ggml_type} cannot stay quantized; supported: {sorted(BLOCK_BYTES)}"
        )
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // BLOCK, BLOCK_BYTES[ggml_type])


def fp16_field(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32 [N, K/32]."""
    return torch.from_numpy(
        blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    )


def q4_codes(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Q4_0/Q4_1 blocks -> (codes uint8 [N, K], d float32 [N, K/32], m float32 [N, K/32] or None)."""
    n, k = shape
    blocks = raw_blocks(data, ggml_type, shape)
    qs = torch.from_numpy(blocks[..., -16:].copy())  # [N, K/32, 16]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)  # element j low nibble, j + 16 high
    d = fp16_field(blocks, 0)
    m = fp16_field(blocks, 2) if ggml_type == "Q4_1" else None
    return codes, d, m


def q8_0_values(data: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Q8_0 blocks -> float32 [N, K], exactly d * q."""
    n, k = shape
    blocks = raw_blocks(data, "Q8_0", shape)
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).float()  # [N, K/32, 32]
    return (q * fp16_field(blocks, 0)[..., None]).reshape(n, k)


def int4_linear_from_gguf(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> Int4Linear:
    """A Q4_0/Q4_1 weight as an `Int4Linear` (group size 32); see the module docstring for exactness.

    `permute_rows` reorders output rows (llama.cpp's q/k or fused qkv reorderings); it commutes with per-row
    block quantization, so it is applied to codes and scales alike.
    """
    codes, d, m = q4_codes(data, ggml_type, shape)
    zeros = torch.zeros_like(d) if m is None else m + 8 * d
    if permute_rows is not None:
        codes, d, zeros = permute_rows(codes), permute_rows(d), permute_rows(zeros)
    return Int4Linear(codes.contiguous(), make_scales_and_zeros(d, zeros), BLOCK, None)


def int8_from_q8_0(
    data: np.ndarray, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks -> per-row int8 (q int8 [N, K], scales float32 [N]); re-quantized, see module docstring.

    Goes through rows in chunks, so no float copy of a whole (embedding-sized) tensor exists at once.
    """
    n, k = shape
    rows = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, -1)  # [N, K/32 * 34]
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, ROW_CHUNK):
        chunk = rows[start : start + ROW_CHUNK]
        q[start : start + len(chunk)], scales[start : start + len(chunk)] = quantize_per_channel(
            q8_0_values(chunk, (len(chunk), k))
        )
    if permute_rows is not None:
        q, scales = permute_rows(q), permute_rows(scales)
    return q, scales


def int8_linear_from_gguf(
    data: np.ndarray, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> Int8Linear:
    """A Q8_0 linear weight as an `Int8Linear`."""
    q, scales = int8_from_q8_0(data, shape, permute_rows)
    return Int8Linear(q, scales, None)


def tied_int8_from_gguf(data: np.ndarray, shape: tuple[int, int]) -> tuple[Int8Embedding, Int8Linear]:
    """A Q8_0 token embedding that doubles as the output head: one int8 copy shared by both modules."""
    q, scales = int8_from_q8_0(data, shape)
    return Int8Embedding(q, scales), Int8Linear(q, scales, None)


def linear_from_gguf(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> Int4Linear | Int8Linear:
    """Dispatch on the GGML type: Q4_0/Q4_1 -> int4, Q8_0 -> int8."""
    if ggml_type == "Q8_0":
        return int8_linear_from_gguf(data, shape, permute_rows)
    return int4_linear_from_gguf(data, ggml_type, shape, permute_rows)
