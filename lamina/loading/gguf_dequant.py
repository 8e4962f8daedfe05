"""Dequantize the common GGUF block formats (Q4_0, Q4_1, Q8_0) with torch, bit-identical to `gguf.quants`.

`gguf.quants` does the same arithmetic in single-threaded numpy; for a model's worth of blocks
torch's vectorized, multi-threaded kernels are several times faster. Other formats fall back to
`gguf.quants` in the caller.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32  # elements per block in all three formats
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
CHUNK_BLOCKS = 2**16  # blocks dequantized at a time: 2M values, 8 MB of float32


def _scales(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block [N, bytes] -> float32 [N, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit values [N, 16] -> [N, 32]: low nibbles are elements 0..15, high ones 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def dequantize(data: np.ndarray, ggml_type: str) -> torch.Tensor | None:
    """Float32 values of the blocks in `data` (uint8, [..., row bytes]) flattened, or None if unsupported.

    Works through CHUNK_BLOCKS blocks at a time into the preallocated result, so the temporaries of
    an embedding-sized tensor stay a few MB instead of several copies of it.
    """
    if ggml_type not in BLOCK_BYTES:
        return None
    block_bytes = BLOCK_BYTES[ggml_type]
    raw = np.asarray(data).reshape(-1)  # the mapped bytes, not copied
    count = raw.size // block_bytes
    out = torch.empty(count * BLOCK, dtype=torch.float32)
    for start in range(0, count, CHUNK_BLOCKS):
        stop = min(count, start + CHUNK_BLOCKS)
        chunk = torch.from_numpy(raw[start * block_bytes : stop * block_bytes].copy())  # writable bytes
        blocks = chunk.view(-1, block_bytes)  # [bytes] -> [blocks, block bytes]
        out[start * BLOCK : stop * BLOCK] = _dequantize_blocks(blocks, ggml_type).reshape(-1)
    return out


def _dequantize_blocks(blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """uint8 [N, block bytes] -> float32 [N, 32]."""
    d = _scales(blocks, 0)
    if ggml_type == "Q8_0":
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d
    if ggml_type == "Q4_0":
        return d * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()
    return d * _nibbles(blocks[:, 4:]).float() + _scales(blocks, 2)
