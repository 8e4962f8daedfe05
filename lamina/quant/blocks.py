"""The block layout Lamina's native block kernel reads (`lamina/kernels/blockq.c`), shared by the
layers that use it: GGUF blocks kept as stored or converted (`blockq.py`, `gguf_convert.py`) and the
`--quantize` schemes' layers repacked for it (`int4.py`, `int8.py`, `nf4.py`, `llm_int8.py`). A weight is 32-column blocks w = d * (c - offset) + m, rows in tiles of 16: codes
(2 to 8 bits) [N/16, K/32, bits * 64] bytes, d and m [N/16, K/32, 16] fp16 (or d per 16 weights,
[N/16, K/16, 16]). Needs N % 16 == 0, K % 32 == 0.
4-bit codes may instead index a code book (NF4/FP4, `nf4.py`): c stands for the table's value.
"""

from __future__ import annotations

import torch

from lamina.kernels import native

BLOCK, TILE = 32, 16
#: (codes, d, m or None, bits, code offset, code book table or None): what a layer hands the kernels.
Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, torch.Tensor | None]


def fp16_holds(scales: torch.Tensor) -> bool:
    """Whether the tiles' fp16 scales can hold these: none beyond fp16's range, and none nonzero that
    fp16 would flush to zero."""
    return bool(scales.abs().max() <= torch.finfo(torch.float16).max) and not torch.any(
        (scales != 0) & (scales.half() == 0)
    )


def fits(out_features: int, in_features: int) -> bool:
    """Whether the tile layout can hold a weight of this shape."""
    return out_features % TILE == 0 and in_features % BLOCK == 0


def tile_base(bits: int) -> int:
    """Bits of a code held in its tile (2 or 4, or all 8); the rest are bit planes (blockq.c)."""
    return 8 if bits == 8 else 2 if bits < 4 else 4


def _bit_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bits above the tile's of codes uint8 [N, K] -> planes uint8 [N/16, K/32, planes * 64] (blockq.c)."""
    n, k = codes.shape
    base = tile_base(bits)
    planes = []
    for plane in range(bits - base):
        bit = (codes >> (base + plane)) & 1
        c = bit.reshape(n // TILE, TILE, k // BLOCK, 8, 4)  # [tile, row, block, j, kk]
        # [tile, block, j, row, kk] -> [tile, block, j, byte, bit] with 8 byte + bit = 4 row + kk
        c = c.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 8, 8, 8)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        planes.append((c * weights).sum(-1, dtype=torch.uint8).reshape(n // TILE, k // BLOCK, 64))
    return torch.cat(planes, dim=-1)


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [N, K] -> the kernel's tiles uint8 [N/16, K/32, bits * 64]."""
    n, k = codes.shape
    base = tile_base(bits)
    if bits != base:
        return torch.cat([tile_codes(codes & (2**base - 1), base), _bit_planes(codes, bits)], dim=-1)
    if bits == 2:
        c = codes.reshape(n // TILE, TILE, k // BLOCK, 2, 4, 4)  # [tile, row, block, v, s, kk]: j = 4v + s
        c = c.permute(0, 2, 3, 4, 1, 5).reshape(n // TILE, k // BLOCK, 2, 4, 64)  # [tile, block, v, s, lane]
        packed = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
        return packed.reshape(n // TILE, k // BLOCK, 128)  # [tile, block, v*lane]
    if bits == 8:
        c = codes.reshape(n // TILE, TILE, k // BLOCK, 8, 4)  # [tile, row, block, j, kk]
        return c.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 8 * 64)  # [tile, block, j*row*kk]
    c = codes.reshape(n // TILE, TILE, k // BLOCK, 2, 4, 4)  # [tile, row, block, half, p, kk]
    packed = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # [tile, row, block, p, kk]: k 4p+kk low, 16+4p+kk high
    return packed.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 4 * 64)  # [tile, block, p*row*kk]


def untile_codes(tiles: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `tile_codes`: uint8 [N/16, K/32, bits * 64] -> codes uint8 [N, K]."""
    ntiles, nblocks, _ = tiles.shape
    base = tile_base(bits)
    if bits != base:
        codes = untile_codes(tiles[..., : 64 * base], base)
        shifts = torch.arange(8, dtype=torch.uint8)
        for plane in range(bits - base):
            packed = tiles[..., 64 * (base + plane) : 64 * (base + plane + 1)]  # [tile, block, 64]
            bit = (packed.reshape(ntiles, nblocks, 8, 8, 1) >> shifts) & 1  # [tile, block, j, byte, bit]
            # bit (8 byte + b) = 4 row + kk  ->  [tile, row, block, j, kk]
            rows = bit.reshape(ntiles, nblocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)
            codes |= rows.reshape(ntiles * TILE, nblocks * BLOCK) << (base + plane)
        return codes
    if bits == 2:
        packed = tiles.reshape(ntiles, nblocks, 2, 1, 64)  # [tile, block, v, 1, lane]
        c = (packed >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)) & 3  # [.., v, s, lane]
        # [tile, block, v, s, row, kk] -> [tile, row, block, v, s, kk] -> [N, K]: k = 16v + 4s + kk
        c = c.reshape(ntiles, nblocks, 2, 4, TILE, 4).permute(0, 4, 1, 2, 3, 5)
        return c.reshape(ntiles * TILE, nblocks * BLOCK)
    if bits == 8:
        c = tiles.reshape(ntiles, nblocks, 8, TILE, 4)  # [tile, block, j, row, kk]
        return c.permute(0, 3, 1, 2, 4).reshape(ntiles * TILE, nblocks * BLOCK)  # [N, K]
    p = tiles.reshape(ntiles, nblocks, 4, TILE, 4)  # [tile, block, p, row, kk]
    halves = torch.stack([p & 15, p >> 4], dim=3)  # [tile, block, p, half, row, kk]
    return halves.permute(0, 4, 1, 3, 2, 5).reshape(ntiles * TILE, nblocks * BLOCK)  # [N, K]


def tile_scales(values: torch.Tensor) -> torch.Tensor:
    """Per-block values [N, K/32] -> their fp16 bits as int16 [N/16, K/32, 16]. The kernel reads fp16;
    int16 storage keeps the bits out of reach of dtype casts (`model.to(torch.bfloat16)`, a loader's
    run dtype), which convert floating tensors only."""
    n, nblocks = values.shape
    tiles = values.reshape(n // TILE, TILE, nblocks).transpose(1, 2)  # [N/16, K/32, 16]
    return tiles.to(torch.float16).contiguous().view(torch.int16)


def scale_values(tiles: torch.Tensor) -> torch.Tensor:
    """Tiled scales (int16 fp16 bits, any shape) -> float32 values."""
    return tiles.view(torch.float16).float()


def untile_scales(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_scales`: int16 [N/16, K/32, 16] -> float32 [N, K/32]."""
    ntiles, nblocks, _ = tiles.shape
    return scale_values(tiles.transpose(1, 2).reshape(ntiles * TILE, nblocks))


@torch.library.custom_op("lamina::blockq_matmul", mutates_args=())
def blockq_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    bits: int,
    offset: int,
    lut: torch.Tensor | None,
) -> torch.Tensor:
    """`native.blockq_matmul` as an op the compiler keeps opaque (a compiled decode step calls it)."""
    return native.blockq_matmul(x, codes, d, m, bits, offset, lut)


@blockq_matmul.register_fake
def _blockq_matmul_shape(
    x: torch.Tensor,
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    bits: int,
    offset: int,
    lut: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], d.shape[0] * d.shape[2])


def blocks_forward(x: torch.Tensor, blocks: Blocks, out_features: int) -> torch.Tensor:
    """x [..., K] times a weight in the block layout -> [..., N] in x's dtype (float32 inside)."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # [..., K] -> [B*T, K]
    matmul = blockq_matmul if torch.compiler.is_compiling() else native.blockq_matmul
    y = matmul(x2, *blocks)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)  # [B*T, N] -> [..., N]
