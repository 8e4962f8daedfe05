"""Dequantize the common GGUF block formats (Q4_0, Q4_1, Q8_0) with torch, bit-identical to `gguf.quants`.

`gguf.quants` does the same arithmetic in single-threaded numpy; for a model's worth of blocks
torch's vectorized, multi-threaded kernels are several times faster. Other formats fall back to
`gguf.quants` in the caller.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32  # elements per block in all three formats


def _scales(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block [N, bytes] -> float32 [N, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit values [N, 16] -> [N, 32]: low nibbles are elements 0..15, high ones 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def dequantize(data: np.ndarray, ggml_type: str) -> torch.Tensor | None:
    """Float32 values of the blocks in `data` (uint8, [..., row bytes]) flattened, or None if unsupported."""
    if ggml_type not in ("Q4_0", "Q4_1", "Q8_0"):
        return None
    raw = torch.from_numpy(np.array(data, copy=True).reshape(-1))  # a writable copy of the mapped bytes
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[ggml_type]
    blocks = raw.view(-1, block_bytes)  # [bytes] -> [N blocks, block bytes]
    d = _scales(blocks, 0)
    if ggml_type == "Q8_0":
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(-1)
    if ggml_type == "Q4_0":
        return (d * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()).reshape(-1)
    return (d * _nibbles(blocks[:, 4:]).float() + _scales(blocks, 2)).reshape(-1)
