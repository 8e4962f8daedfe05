"""GGUF blocks kept as they are (Q4_0, Q4_1, Q8_0) and multiplied by Lamina's native CPU kernel; Q5_x,
the K-quants and IQ4 come converted by `gguf_convert.py` into the formats listed in `FORMATS`.

Each 32-weight block along in_features keeps its own fp16 scale d (and, for Q4_1, fp16 bias m), so
the weights are exactly the file's: w = d * (c - offset) + m. The kernel (`lamina/kernels/blockq.c`)
quantizes activations per 32-block to int8, as llama.cpp does, and sums exact integer products.
This replaces the int4/int8 conversion of `gguf_formats` on CPUs the kernel supports: it reads
each weight once at its stored size, and the output head keeps its per-block Q8_0 scales instead
of being re-quantized per row.

Runtime layout (`tile_codes`, `tile_scales`): rows in tiles of 16, blocks of 32 (see blockq.c);
needs out_features % 16 == 0 and in_features % 32 == 0. Off the CPU, or where the kernel cannot be
built, `forward` falls back to dequantizing the weight (correct, slow).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from lamina.kernels import native
from lamina.loading.gguf_layout import RowOrder
from lamina.quant.base import QuantizedLinear, check_shape, require_tensors
from lamina.quant.blocks import (
    BLOCK,
    TILE,
    Blocks,
    blocks_forward,
    fits,
    scale_values,
    tile_base,
    tile_codes,
    tile_scales,
    untile_codes,
    untile_scales,
)
from lamina.quant.gguf_convert import CONVERTED, GRID_BOOKS, GRID_SCALED_BY_16, converted_blocks
from lamina.quant.gguf_formats import fp16_field, q4_codes, raw_blocks
from lamina.quant.int4 import pack_nibbles, unpack_nibbles

#: Block format -> (code bits, code offset, has a per-block bias m, weights per scale d).
FORMATS: dict[str, tuple[int, int, bool, int]] = {
    "Q4_0": (4, 8, False, 32),
    "Q4_1": (4, 0, True, 32),
    "Q8_0": (8, 128, False, 32),
    # Q8_0 with a bias m per block (no GGML type: asymmetric int8 checkpoints, `hub_formats`)
    "Q8_M": (8, 128, True, 32),
    "Q5_0": (5, 16, False, 32),
    "Q5_1": (5, 0, True, 32),
    "Q6_K": (6, 32, False, 16),
    "Q3_K": (3, 4, False, 16),
    "Q2_K": (2, 0, True, 16),
    "IQ4_NL": (4, 128, False, 32),
    "MXFP4": (4, 128, False, 32),
    "NVFP4": (4, 128, False, 16),
    **{t: (4, 128, False, 16 if t in GRID_SCALED_BY_16 else 32) for t in GRID_BOOKS},
}
#: Block formats whose 4-bit codes index a code book: format -> its integer values, w = d * book[c].
CODE_BOOKS = {
    "IQ4_NL": tuple(quants.IQ4_NL.kvalues),
    "MXFP4": tuple(quants.MXFP4.kvalues),
    "NVFP4": tuple(quants.NVFP4.kvalues),
    **{t: book + (0,) * (16 - len(book)) for t, book in GRID_BOOKS.items()},  # unused codes: 0
}


@functools.cache
def code_book_table(block_format: str) -> torch.Tensor:
    """The kernel's uint8 [32] table for an integer code book (blockq.c): a = value + 128 and b = 64,
    nothing left over, so the kernel's weight is exactly d * book[c]. Never moved (the kernel keeps its
    address)."""
    values = torch.tensor(CODE_BOOKS[block_format], dtype=torch.int16)
    return torch.cat([values + 128, torch.full((16,), 64, dtype=torch.int16)]).to(torch.uint8)


def code_values(block_format: str, codes: torch.Tensor, offset: int) -> torch.Tensor:
    """What codes stand for before their scale: c - offset, or the code book's values; float32."""
    if block_format in CODE_BOOKS:
        return torch.tensor(CODE_BOOKS[block_format], dtype=torch.float32)[codes.long()]
    return codes.float() - offset


def gguf_blocks(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int]
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Raw GGUF bytes of a [N, K] tensor in a `KEPT_TYPES` type -> (its block format in `FORMATS`, the
    blocks: codes uint8 [N, K] unsigned with the offset included, d and m float32 [N, K/32] or
    [N, K/16], m only where the format has one). Q4_0/Q4_1/Q8_0 are exactly as stored; other types as
    `gguf_convert` converts them, or None where their scales do not fit the blocks."""
    if ggml_type in CONVERTED:
        return converted_blocks(data, ggml_type, shape)
    n, k = shape
    if ggml_type == "Q8_0":
        blocks = raw_blocks(data, ggml_type, shape)
        codes = torch.from_numpy(blocks[..., 2:] ^ np.uint8(0x80)).reshape(n, k)  # int8 q -> q + 128
        return ggml_type, {"codes": codes, "d": fp16_field(blocks, 0)}
    codes, d, m = q4_codes(data, ggml_type, shape)
    return ggml_type, {"codes": codes, "d": d} if m is None else {"codes": codes, "d": d, "m": m}


def runs_natively(device: torch.device, shape: tuple[int, int]) -> bool:
    """Whether a GGUF weight of `shape` on `device` is kept as blocks on the native kernel."""
    return device.type == "cpu" and fits(*shape) and native.library() is not None


#: GGML types that can become a `BlockQuantLinear`: kept as stored, or converted (`gguf_convert.py`).
KEPT_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"}) | frozenset(CONVERTED)


def block_format(ggml_type: str) -> str:
    """The `FORMATS` entry a `KEPT_TYPES` type's blocks take."""
    return CONVERTED.get(ggml_type, ggml_type)


#: A `BlockQuantLinear`'s tile buffers (m_tiled None where the format has no m).
TILE_BUFFERS = ("codes_tiled", "d_tiled", "m_tiled")
#: Rows converted at a time when a tensor keeps its row order: conversion holds a few copies of what
#: it converts (codes unpacked, tiled); the default model's 49152-row embedding converted at once put
#: a load under a 60 MB cap 6-11 MB over it.
CHUNK_ROWS = 1024


def empty_blocks(ggml_type: str, shape: tuple[int, int], device: str = "meta") -> BlockQuantLinear:
    """A `BlockQuantLinear` (uninitialized; on the meta device by default) with the tiles a [N, K]
    tensor of `ggml_type` (a `KEPT_TYPES` type) becomes."""
    n, k = shape
    bits, _, has_m, scale_block = FORMATS[block_format(ggml_type)]
    codes = torch.empty(n // TILE, k // BLOCK, bits * BLOCK * TILE // 8, dtype=torch.uint8, device=device)
    scales = (n // TILE, k // scale_block, TILE)
    # torch.empty, not empty_like: on the meta device empty_like goes through torch._refs, which
    # imports sympy (34 MB)
    d = torch.empty(scales, dtype=torch.int16, device=device)
    m = torch.empty(scales, dtype=torch.int16, device=device) if has_m else None
    return BlockQuantLinear(block_format(ggml_type), codes, d, m)


def blockq_linear_from_gguf(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> BlockQuantLinear | None:
    """A GGUF tensor's raw bytes (a `KEPT_TYPES` type, [N, bytes per row]) as a `BlockQuantLinear`,
    output rows reordered by `permute_rows` (per-row blocks commute with it); None where its scales do
    not fit the blocks. Without a reordering, CHUNK_ROWS rows at a time (tiles hold whole rows)."""
    if permute_rows is None and shape[0] > CHUNK_ROWS:
        return _by_rows(data, ggml_type, shape)
    stored = gguf_blocks(data, ggml_type, shape)
    if stored is None:
        return None
    block_format, blocks = stored
    if permute_rows is not None:
        blocks = {name: permute_rows(t) for name, t in blocks.items()}
    return BlockQuantLinear.from_blocks(block_format, **blocks)


def _by_rows(data: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> BlockQuantLinear | None:
    n, k = shape
    layer = empty_blocks(ggml_type, shape, device="cpu")
    for start in range(0, n, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n - start)
        part = blockq_linear_from_gguf(data[start : start + rows], ggml_type, (rows, k))
        if part is None:
            return None
        for name in TILE_BUFFERS:
            whole = getattr(layer, name)
            if whole is not None:
                whole[start // TILE : (start + rows) // TILE] = getattr(part, name)
    return layer


class BlockQuantLinear(QuantizedLinear):
    """A linear whose weight is GGUF blocks (`FORMATS`), on the native kernel."""

    method = "gguf"
    formats: ClassVar[dict[str, tuple[int, int, bool, int]]] = FORMATS

    def __init__(
        self,
        ggml_type: str,
        codes_tiled: torch.Tensor,
        d_tiled: torch.Tensor,
        m_tiled: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """From tiles (see `blocks.py`); `from_blocks` builds them from codes and scales."""
        super().__init__(codes_tiled.shape[1] * BLOCK, codes_tiled.shape[0] * TILE, bias)
        self.ggml_type = ggml_type
        self.bits, self.offset, _, self.scale_block = FORMATS[ggml_type]
        self.register_buffer("codes_tiled", codes_tiled)
        self.register_buffer("d_tiled", d_tiled)
        self.register_buffer("m_tiled", m_tiled)
        self.use_native = native.library() is not None  # decided once: forward is traced when compiled

    @classmethod
    def from_blocks(
        cls,
        ggml_type: str,
        codes: torch.Tensor,
        d: torch.Tensor,
        m: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> BlockQuantLinear:
        """`codes` uint8 [N, K] unsigned (Q8_0: q + 128), `d` / `m` [N, K/32] (per 16 weights, [N, K/16],
        for Q2_K, Q3_K and Q6_K);
        N % 16 == 0, K % 32 == 0."""
        bits, _, has_m, _ = FORMATS[ggml_type]
        m_tiled = tile_scales(m) if has_m else None
        return cls(ggml_type, tile_codes(codes.to(torch.uint8), bits), tile_scales(d), m_tiled, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, ggml_type: str = "Q8_0", **opts: Any) -> BlockQuantLinear:
        """Quantize a float linear into GGUF blocks with `gguf`'s own quantizer (what llama.cpp's
        converter writes), e.g. for tests and for weights a GGUF stores as float."""
        weight = linear.weight.detach().float().cpu().numpy()
        data = quants.quantize(weight, GGMLQuantizationType[ggml_type])
        block_format, blocks = gguf_blocks(data, ggml_type, tuple(weight.shape))
        return cls.from_blocks(block_format, **blocks, bias=linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> BlockQuantLinear:
        where, ggml_type = config.get("name", "?"), config["ggml_type"]
        bits, _, has_m, scale_block = FORMATS[ggml_type]
        names = ("codes", "d", "m") if has_m else ("codes", "d")
        stored = require_tensors(tensors, names, where)
        check_shape(stored[0], (out_features, in_features // 2 if bits == 4 else in_features), "codes", where)
        for name, t in zip(names[1:], stored[1:], strict=True):
            check_shape(t, (out_features, in_features // scale_block), name, where)
        codes = unpack_nibbles(stored[0]) if bits == 4 else stored[0]
        return cls.from_blocks(ggml_type, codes, *(t.float() for t in stored[1:]), bias=tensors.get("bias"))

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> BlockQuantLinear | None:
        """Stack the layers' tiles along the outputs (tiles hold whole rows, so this is exact)."""
        if not cls.alike(layers, lambda layer: (layer.ggml_type, layer.in_features)):
            return None
        first = layers[0]
        tiles = [[getattr(layer, name) for layer in layers] for name in ("codes_tiled", "d_tiled", "m_tiled")]
        codes, d, m = (None if parts[0] is None else torch.cat(parts) for parts in tiles)  # [sum N/16, ...]
        return cls(first.ggml_type, codes, d, m, cls.concatenated_bias(layers))

    def scheme_config(self) -> dict[str, Any]:
        return {"method": self.method, "ggml_type": self.ggml_type}

    def codes(self) -> torch.Tensor:
        """Unsigned codes uint8 [N, K]."""
        return untile_codes(self.codes_tiled.cpu(), self.bits)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        codes = self.codes()
        out = {
            "codes": pack_nibbles(codes) if self.bits == 4 else codes,
            "d": untile_scales(self.d_tiled.cpu()).half(),
        }
        if self.m_tiled is not None:
            out["m"] = untile_scales(self.m_tiled.cpu()).half()
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        # [N, K] -> [N, K/32, 32] (Q6_K: [N, K/16, 16]), one scale per row of the last dim
        c = code_values(self.ggml_type, self.codes(), self.offset).reshape(n, k // self.scale_block, -1)
        w = untile_scales(self.d_tiled.cpu())[..., None] * c
        if self.m_tiled is not None:
            w = w + untile_scales(self.m_tiled.cpu())[..., None]
        return w.reshape(n, k)

    def native_blocks(self) -> Blocks | None:
        """The `Blocks` the native kernels take (a code book for IQ4_NL), or None where they do not run."""
        if not self.use_native or self.codes_tiled.device.type != "cpu":
            return None
        lut = code_book_table(self.ggml_type) if self.ggml_type in CODE_BOOKS else None
        return self.codes_tiled, self.d_tiled, self.m_tiled, self.bits, self.offset, lut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.native_blocks()
        if blocks is not None:
            y = blocks_forward(x, blocks, self.out_features)
        else:  # dequantize-then-matmul: correct, slow
            y = (x.float() @ self.dequantize().to(x.device).t()).to(x.dtype)
        return self._add_bias(y)


class BlockQuantEmbedding(nn.Module):
    """A token embedding on the tiles of a `BlockQuantLinear` (one copy when that is the tied head);
    looked-up rows are dequantized exactly, d (c - offset) + m, whatever the block format."""

    def __init__(self, head: BlockQuantLinear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("codes_tiled", head.codes_tiled)
        self.register_buffer("d_tiled", head.d_tiled)
        self.register_buffer("m_tiled", head.m_tiled)
        self.block_format, self.bits, self.offset = head.ggml_type, head.bits, head.offset
        self.output_dtype = torch.float32  # the model's activation dtype

    def _codes(self, tile: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Rows `tile * 16 + row` of the codes, uint8 [..., K/32, 32]."""
        ntiles, nblocks, _ = self.codes_tiled.shape
        if self.bits == 8:
            # [tile, block, j, row, kk] -> picked [..., K/32, 8, 4] -> [..., K/32, 32]: k = 4j + kk
            picked = self.codes_tiled.view(ntiles, nblocks, 8, TILE, 4)[tile, :, :, row, :]
            return picked.flatten(-2)
        base = tile_base(self.bits)
        if base == 4:
            # [tile, block, p, row, kk] -> [..., K/32, 4, 4]; low nibble k = 4p + kk, high 16 + 4p + kk
            picked = self.codes_tiled[..., :256].reshape(ntiles, nblocks, 4, TILE, 4)[tile, :, :, row, :]
            parts = torch.stack([picked & 15, picked >> 4], dim=-3)  # [..., K/32, 2, 4, 4]
        else:
            # [tile, block, v, row, kk] -> [..., K/32, 2, 4]; bits 2s..2s+1 = k 16v + 4s + kk
            picked = self.codes_tiled[..., :128].reshape(ntiles, nblocks, 2, TILE, 4)[tile, :, :, row, :]
            shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]  # [4 s, 1]
            parts = (picked[..., None, :] >> shifts) & 3  # [..., K/32, 2, 4, 4]
        codes = parts.flatten(-3)  # [..., K/32, 32]
        # bit planes [tile, block, plane, j, byte]: bit `base + plane` of k 4j + kk is bit
        # 4 (row % 2) + kk of byte row // 2
        planes = self.codes_tiled[..., 64 * base :].reshape(ntiles, nblocks, self.bits - base, 8, 8)
        shifts = ((4 * (row % 2))[..., None, None, None] + torch.arange(4)).to(torch.uint8)  # [..., 1, 1, 4]
        for plane in range(self.bits - base):
            picked = planes[tile, :, plane, :, row // 2]  # [..., K/32, 8]
            bit = (picked[..., None] >> shifts) & 1  # [..., K/32, 8, 4]
            codes = codes | (bit.flatten(-2) << (base + plane))
        return codes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tile, row = ids // TILE, ids % TILE
        scales = scale_values(self.d_tiled[tile, :, row])  # [..., K/32] (Q6_K: [..., K/16])
        codes = code_values(self.block_format, self._codes(tile, row), self.offset).flatten(-2)  # [..., K]
        # [..., K] -> [..., K/32, 32] (Q6_K: [..., K/16, 16]), one scale per row of the last dim
        values = codes.unflatten(-1, (scales.shape[-1], -1)) * scales[..., None]
        if self.m_tiled is not None:
            values = values + scale_values(self.m_tiled[tile, :, row])[..., None]
        return values.flatten(-2).to(self.output_dtype)  # [..., K]

    def dequantize(self) -> torch.Tensor:
        """The float32 table [num_embeddings, embedding_dim]."""
        return self.forward(torch.arange(self.num_embeddings))
