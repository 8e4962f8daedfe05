"""NF4 and FP4 (bitsandbytes' 4-bit formats), block size 64, optional double quantization.

Each block of 64 consecutive weights (row-major over the flattened weight, as bitsandbytes does) keeps
one float32 absmax; a weight is stored as the 4-bit index of the nearest code book value to
w / absmax, so w ~= CODE[q] * absmax. The code books below are bitsandbytes' values
(`bitsandbytes.functional.get_4bit_type`), indices included, so codes are interchangeable.

Double quantization ("-dq") stores the absmax values themselves in 8 bits, as bitsandbytes does:
subtract their mean, then per 256 absmax values one float32 scale (their largest magnitude) and an
8-bit code each into bitsandbytes' dynamic map (`dynamic_map`: signed, exponent bits up to 7), the
nearest by the map's midpoints. absmax = map[code] * scale + mean, the same bits as bitsandbytes'
`quantize_4bit(..., compress_statistics=True)` (tested against it). That cuts scale overhead from 0.5
to ~0.127 bits per weight. Checkpoints saved before stored linear int8 codes (int8 `absmax_q`, a step
of scale / 127); they still load.

Kernels: there is no packed NF4/FP4 kernel in torch.
- CPU: `use_native_blocks` repacks the codes into the tiles of Lamina's native block kernel
  (`lamina/kernels/blockq.c`), which looks the code book up with VPSHUFB. Each block's scale is
  absmax / 127 in fp16 (11 significant bits) and the code book values are held to 3.1e-5 of absmax, so
  the kernel's weight is within ~2.7e-4 absmax of the stored one; the stored codes and absmax are
  unchanged. Costs an fp16 scale per 32 weights (0.5 bits per weight) on top of the stored absmax.
- CUDA with bitsandbytes installed: the weight is re-quantized by bitsandbytes on first use (same codes,
  same block absmax; with double quantization bitsandbytes' own 8-bit absmax) and runs on
  `bnb.matmul_4bit`; that cache holds a second copy on the GPU.
- Elsewhere `forward` dequantizes the whole weight and does a float matmul: correct but slow (it
  expands the weight on every call).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import nn

from lamina.errors import InvalidArgumentError
from lamina.kernels import native
from lamina.quant.base import QuantizedLinear, check_shape, field_problem, is_positive_int, require_tensors
from lamina.quant.blocks import BLOCK, Blocks, blocks_forward, fits, tile_codes, tile_scales, untile_codes
from lamina.quant.int4 import pack_nibbles, unpack_nibbles

BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes.functional.get_4bit_type("fp4"): [0, 0.0625, 8, 12, 4, 6, 2, 3, then negatives] / 12.
FP4_CODE = tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
CODE_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def quantize_blockwise_4bit(weight: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened blocks of 64 -> (codes uint8 [N, K] indexing `code`, absmax float32 [numel / 64])."""
    flat = weight.detach().float().reshape(-1, BLOCK_SIZE)  # [numel/64, 64]
    absmax = flat.abs().amax(dim=1).clamp(min=1e-12)
    normed = flat / absmax[:, None]
    code = code.to(flat.device)
    q = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.shape[0], 4096):  # bounded [rows, 64, 16] temporaries
        chunk = normed[start : start + 4096]
        q[start : start + 4096] = (chunk[..., None] - code).abs().argmin(dim=-1).to(torch.uint8)
    return q.reshape(weight.shape), absmax


@functools.cache
def byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: byte b -> (CODE[b & 15], CODE[b >> 4]), so one gather decodes a packed byte.

    Shared by every layer of a type on a device (2 KB each), not stored per layer.
    """
    code = torch.tensor(CODE_BOOKS[quant_type], dtype=torch.float32, device=device)
    return torch.stack([code.repeat(16), code.repeat_interleave(16)], dim=-1)


@functools.cache
def kernel_table(quant_type: str) -> torch.Tensor:
    """The native kernel's uint8 [32] table for a code book (blockq.c): 127 v = (a - 128) + (b - 64) / 128
    to within 2^-8, a = table[c], b = table[16 + c]. One per type, never moved (the kernel keeps its address)."""
    scaled = torch.tensor(CODE_BOOKS[quant_type], dtype=torch.float64) * 127  # [16]
    whole = scaled.round()
    return torch.cat([whole + 128, ((scaled - whole) * 128).round() + 64]).to(torch.uint8)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (`create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`), built the same way: float32 [256], sorted, from -1 to 1."""
    data: list[float] = []
    for i in range(7):  # exponents 10^-6 .. 10^0, 2^i fractions each, both signs
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))  # bitsandbytes pads to 256 with zeros
    return torch.tensor(sorted(data), dtype=torch.float32)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax float32 [M] -> (uint8 codes into `dynamic_map` [M], float32 scales [ceil(M / 256)],
    float32 offset [1]), as bitsandbytes' `quantize_blockwise(absmax - mean, blocksize=256)`."""
    offset = absmax.float().mean().reshape(1)
    centered = absmax.float() - offset
    pad = (-centered.numel()) % DQ_BLOCK_SIZE
    blocks = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, DQ_BLOCK_SIZE)  # [M/256, 256]
    scales = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / scales.clamp(min=1e-38))[:, None], -1, 1)  # [M/256, 256]
    code = dynamic_map()
    q = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return q[: absmax.numel()], scales, offset


def double_dequantize(q: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 absmax [M] from `double_quantize`'s codes (uint8: dynamic map, as bitsandbytes), or from
    the linear int8 codes checkpoints saved before held (code * scale)."""
    values = q.float() if q.dtype == torch.int8 else dynamic_map()[q.long()]
    return values * scales.repeat_interleave(DQ_BLOCK_SIZE)[: q.numel()] + offset


#: Looked up once: `find_spec` in a forward would break a compiled decode step's graph.
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


class NF4Linear(QuantizedLinear):
    """NF4 / FP4 block-wise 4-bit linear (`method` is nf4, fp4, nf4-dq or fp4-dq)."""

    def __init__(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        quant_type: str,
        double_quant: bool,
        bias: torch.Tensor | None,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        self.quant_type, self.double_quant = quant_type, double_quant
        self.method = f"{quant_type}-dq" if double_quant else quant_type
        self.register_buffer("weight_packed", pack_nibbles(codes))
        # the native block layout, set by `use_native_blocks` (it then replaces weight_packed)
        self.register_buffer("codes_tiled", None, persistent=False)
        self.register_buffer("d_tiled", None, persistent=False)
        if double_quant:
            q, scales, offset = double_quantize(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scales", scales)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax.float())
        self._bnb: tuple[torch.Tensor, Any] | None = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        double_quant: bool = False,
        name: str = "?",
        **opts: Any,
    ) -> NF4Linear:
        if quant_type not in CODE_BOOKS:
            raise InvalidArgumentError(f"unknown 4-bit type {quant_type!r}; use one of {sorted(CODE_BOOKS)}")
        if linear.weight.numel() % BLOCK_SIZE:
            raise InvalidArgumentError(
                f"layer {name} has {linear.weight.numel()} weights, not a multiple of the NF4/FP4 block size "
                f"{BLOCK_SIZE}; leave it float"
            )
        codes, absmax = quantize_blockwise_4bit(linear.weight, torch.tensor(CODE_BOOKS[quant_type]))
        return cls(codes, absmax, quant_type, double_quant, linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> NF4Linear:
        where = config.get("name", "?")
        quant_type, dq = config["quant_type"], bool(config["double_quant"])
        (packed,) = require_tensors(tensors, ("weight_packed",), where)
        check_shape(packed, (out_features, in_features // 2), "weight_packed", where)
        if dq:
            absmax = double_dequantize(
                *require_tensors(tensors, ("absmax_q", "absmax_scales", "absmax_offset"), where)
            )
        else:
            (absmax,) = require_tensors(tensors, ("absmax",), where)
        check_shape(absmax, (out_features * in_features // BLOCK_SIZE,), "absmax", where)
        layer = cls(unpack_nibbles(packed), absmax, quant_type, False, tensors.get("bias"))
        if dq:  # keep the stored int8 absmax bit-for-bit instead of re-quantizing it
            layer._set_double_quant(tensors["absmax_q"], tensors["absmax_scales"], tensors["absmax_offset"])
        return layer

    @classmethod
    def config_problem(cls, config: dict[str, Any]) -> str | None:
        """Besides the base checks: a known `quant_type`, a bool `double_quant`, both agreeing with the
        layer's `method` (nf4-dq is nf4 + double_quant), and `block_size`, where given, the one size
        the stored absmax implies (64)."""
        problem = (
            super().config_problem(config)
            or field_problem(
                config,
                "quant_type",
                lambda v: isinstance(v, str) and v in CODE_BOOKS,
                f"not one of {sorted(CODE_BOOKS)}",
            )
            or field_problem(config, "double_quant", lambda v: isinstance(v, bool), "not true or false")
            or field_problem(
                config,
                "block_size",
                lambda v: is_positive_int(v) and v == BLOCK_SIZE,
                f"not {BLOCK_SIZE}",
                required=False,
            )
        )
        if problem is None:
            implied = f"{config['quant_type']}-dq" if config["double_quant"] else config["quant_type"]
            if config.get("method") != implied:
                return (
                    f"has method {config.get('method')!r} but quant_type {config['quant_type']!r} and "
                    f"double_quant {str(config['double_quant']).lower()}, which make {implied!r}"
                )
        return problem

    def _set_double_quant(self, q: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor) -> None:
        del self.absmax
        self.double_quant, self.method = True, f"{self.quant_type}-dq"
        self.register_buffer(
            "absmax_q", q if q.dtype == torch.int8 else q.to(torch.uint8)
        )  # int8: older saves
        self.register_buffer("absmax_scales", scales.float())
        self.register_buffer("absmax_offset", offset.float())

    def scheme_config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "block_size": BLOCK_SIZE,
        }

    def export_tensors(self) -> dict[str, torch.Tensor]:
        names = ("absmax_q", "absmax_scales", "absmax_offset") if self.double_quant else ("absmax",)
        out = {n: getattr(self, n).cpu() for n in names}
        out["weight_packed"] = self.packed_codes().cpu()
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def block_absmax(self) -> torch.Tensor:
        """float32 [numel / 64] absmax per block (dequantized when double-quantized)."""
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_scales, self.absmax_offset)
        return self.absmax

    def packed_codes(self) -> torch.Tensor:
        """uint8 [N, K/2] two codes a byte (low nibble = even column), whatever the runtime layout."""
        if self.codes_tiled is None:
            return self.weight_packed
        return pack_nibbles(untile_codes(self.codes_tiled, 4))

    def use_native_blocks(self) -> bool:
        """Repack for Lamina's native block kernel when it runs here (see the module docstring);
        returns whether the layer now uses it. Needs rows of whole 64-blocks (in_features % 64 == 0)."""
        n, k = self.out_features, self.in_features
        if (
            self.codes_tiled is not None
            or self.weight_packed.device.type != "cpu"
            or not fits(n, k)
            or k % BLOCK_SIZE
            or native.library() is None
        ):
            return False
        scales = self.block_absmax().reshape(n, k // BLOCK_SIZE) / 127  # [N, K/64]
        if scales.max() > torch.finfo(torch.float16).max:
            return False
        self.d_tiled = tile_scales(scales.repeat_interleave(BLOCK_SIZE // BLOCK, dim=1))  # [N, K/32] tiled
        self.codes_tiled = tile_codes(unpack_nibbles(self.weight_packed), 4)
        self.weight_packed = None
        return True

    def native_blocks(self) -> Blocks | None:
        """(codes, d, m tiles, bits, code offset, code book) for the native kernels, or None off them."""
        if self.codes_tiled is None or self.codes_tiled.device.type != "cpu":
            return None
        return self.codes_tiled, self.d_tiled, None, 4, 128, kernel_table(self.quant_type)

    def dequantize(self) -> torch.Tensor:
        packed = self.packed_codes()
        table = byte_table(self.quant_type, packed.device)
        values = torch.nn.functional.embedding(packed.int(), table)  # [N, K/2, 2]
        blocks = values.reshape(-1, BLOCK_SIZE) * self.block_absmax()[:, None]  # [numel/64, 64]
        return blocks.reshape(self.out_features, self.in_features)

    def _bnb_state(self) -> tuple[torch.Tensor, Any] | None:
        """bitsandbytes' packed weight + QuantState on CUDA, or None when unavailable."""
        if self.block_absmax().device.type != "cuda" or not HAS_BITSANDBYTES:
            return None
        if self._bnb is None:
            import bitsandbytes.functional as bnbf

            # From the float32 weight: each block's largest value is its absmax exactly, so bitsandbytes
            # finds the same absmax and codes (from an fp16 copy the absmax would be rounded to fp16).
            qweight, state = bnbf.quantize_4bit(
                self.dequantize(),
                blocksize=BLOCK_SIZE,
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
            )
            state.dtype = torch.float16  # what it dequantizes to: the fp16 activations' matmul
            self._bnb = qweight, state
        return self._bnb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.native_blocks()
        if blocks is not None:
            return self._add_bias(blocks_forward(x, blocks, self.out_features))
        bnb_state = self._bnb_state()
        if bnb_state is not None:
            import bitsandbytes as bnb

            qweight, state = bnb_state
            y = bnb.matmul_4bit(x.to(torch.float16), qweight.t(), quant_state=state).to(x.dtype)
        else:
            y = torch.nn.functional.linear(x, self.dequantize().to(x.dtype))
        return self._add_bias(y)
