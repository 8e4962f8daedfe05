"""Checkpoints quantized to int4 or int8 by other tools, loaded as stored: GPTQ (AutoGPTQ, GPTQModel,
optimum; 4 or 8 bits), AWQ (AutoAWQ's GEMM layout; 4 bits) and compressed-tensors' pack-quantized and
int-quantized (llm-compressor; see `_unpack_compressed_tensors`), the formats most quantized Hub models
come in (`hub_scheme.py` reads which one a checkpoint declares). Each quantized linear `NAME` is stored
as `NAME.qweight` (int32 words of P = 32 / bits codes), `NAME.qzeros` (int32 words of P zero points,
one row per group), `NAME.scales` (fp16 [K/G, N]) and, for GPTQ, `NAME.g_idx` (int32 [K], each
input's group). The weight is w[n, k] = s (q - z) with the group's scale s and zero point z:

- GPTQ: qweight [K/P, N] holds inputs Pi..Pi+P-1 of output n at bits (bits j); qzeros [K/G, N/P]
  holds outputs Pi..Pi+P-1 likewise. The original ("gptq", v1) checkpoint format stores z - 1 for
  every zero point, subtracted from the whole word (AutoGPTQ's offset, so a zero of 0 borrows from
  its neighbour); adding 0x11111111 (8 bits: 0x01010101) to the word undoes it exactly. "gptq_v2"
  (GPTQModel) stores z.
- AWQ GEMM: qweight [K, N/8] and qzeros [K/G, N/8] both hold outputs, eight a word in the order
  0 2 4 6 1 3 5 7; z as is.

On the native CPU kernel a layer becomes a `BlockQuantLinear`: the codes as they are, d = s (rounded
to fp16: exact for GPTQ's and AWQ's fp16 scales), as Q4_0 / Q8_0 when every z is 2^(bits - 1)
(symmetric: exact) and otherwise as Q4_1 with m = -s z, or Q8_M (Q8_0 plus a bias per block) with
m = s (128 - z), m rounded to fp16 (within 2^-11 of it: 15 s 2^-11, 128 s 2^-11 at most).
Elsewhere a 4-bit layer becomes an `Int4Linear`, whose bf16 scale and zero round s and s (8 - z) to 8
significant bits; an 8-bit one an `Int8Linear` when it is symmetric with a scale per output (exact),
else a 16-bit `HalfLinear` of its weights. A GPTQ act-order checkpoint (`desc_act`) whose g_idx
scatters the groups over the inputs is reordered so each group's inputs are adjacent
(`ReorderedInputLinear`, which gathers x's columns in that order per call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lamina.errors import CheckpointError
from lamina.quant.base import QuantizedLinear
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.blocks import BLOCK, Blocks, fits
from lamina.quant.half import half_linear
from lamina.quant.hub_scheme import COMPRESSED_TENSORS, INT_QUANTIZED, HubScheme
from lamina.quant.int4 import GROUP_SIZES, Int4Linear, make_scales_and_zeros
from lamina.quant.int8 import Int8Linear

#: AWQ GEMM packs outputs 8j..8j+7 of a word in this order: the code at bits 4i is output AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Tensor name suffixes of one quantized linear, (required, optional), the first naming its layers;
#: any may add a bias.
GPTQ_PARTS = (("qweight", "qzeros", "scales"), ("g_idx",))
CT_PARTS = (("weight_packed", "weight_scale"), ("weight_zero_point", "weight_shape", "weight_g_idx"))
#: compressed-tensors int-quantized: `NAME.weight` is int8, so the scale names the quantized layers
CT_INT_PARTS = (("weight_scale", "weight"), ("weight_zero_point",))


def packed_parts(scheme: HubScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor name suffixes of a layer the scheme packs."""
    if scheme.method != COMPRESSED_TENSORS:
        return GPTQ_PARTS
    return CT_INT_PARTS if scheme.checkpoint_format == INT_QUANTIZED else CT_PARTS


def unpack_words(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Integer [R, C] words of P = 32 / bits codes (their low 32 bits) -> uint8 [R, P C]: the code at
    bits (bits i) of word c is column P c + order[i]. One shift at a time: a 14336 x 4096 layer's
    4-bit codes would take 470 MB as int64 all at once, 59 MB as the uint8 result."""
    per_word = 32 // bits
    codes = torch.empty(*words.shape, per_word, dtype=torch.uint8)  # [R, C, P] in column order
    for i, column in enumerate(order or range(per_word)):
        codes[..., column] = (words >> (bits * i)) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)  # [R, C, P] -> [R, P C]


def v1_zero_offset(bits: int) -> int:
    """What GPTQ v1 subtracted from each qzeros word: one in every code's lowest bit."""
    return sum(1 << (bits * i) for i in range(32 // bits))


@dataclass
class UnpackedLayer:
    """One stored linear in Lamina's orientation: w[n, k] = scales[n, g] (codes[n, k] - zeros[n, g]) with
    g = k // group_size, after `order` (None: the inputs' own order) rearranged the inputs; the last
    group may be shorter (a 576-wide layer at group size 128 has four groups of 128 and one of 64)."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, ceil(K/G)]
    zeros: torch.Tensor  # uint8 [N, ceil(K/G)]
    group_size: int
    order: torch.Tensor | None  # int64 [K]: input k of the layer is input order[k] of x
    bits: int = 4

    @property
    def symmetric(self) -> bool:
        """Every zero point mid-range, 2^(bits - 1): w = s (q - 2^(bits - 1))."""
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    def per_block(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """Per-group values [N, ceil(K/G)] -> one per `width` inputs [N, K/width]; `width` divides
        the group size and K."""
        return values[:, torch.arange(0, self.codes.shape[1], width) // self.group_size]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the stored input order (before `order`)."""
        s, z = self.per_block(self.scales, 1), self.per_block(self.zeros, 1).float()  # [N, K] each
        w = s * (self.codes.float() - z)
        return w if self.order is None else w[:, self.order.argsort()]


def unpack_layer(
    scheme: HubScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, int], name: str
) -> UnpackedLayer:
    """A layer's stored tensors (`packed_parts(scheme)`) -> `UnpackedLayer`; `shape` is the
    model's [N, K] for the layer. Wrong shapes or dtypes are a CheckpointError naming the tensor."""
    n, k = shape
    bits = scheme.bits
    per_word = 32 // bits
    if n % per_word or k % BLOCK:
        raise CheckpointError(
            f"layer {name} is [{n}, {k}], which Lamina cannot hold as {scheme.describe()} (outputs a "
            f"multiple of {per_word}, inputs of {BLOCK}); the config and the weights disagree"
        )
    group_size = k if scheme.group_size == -1 else scheme.group_size
    groups = -(-k // group_size)
    if scheme.method == COMPRESSED_TENSORS:
        return _unpack_compressed_tensors(scheme, tensors, (n, k), group_size, name)
    qweight, qzeros, scales = (tensors[part] for part in GPTQ_PARTS[0])
    gptq = scheme.method == "gptq"
    _check(qweight, (k // per_word, n) if gptq else (k, n // per_word), f"{name}.qweight", torch.int32)
    _check(qzeros, (groups, n // per_word), f"{name}.qzeros", torch.int32)
    _check(scales, (groups, n), f"{name}.scales", None)
    if gptq:
        codes = unpack_words(qweight.t().contiguous(), bits)  # [N, K/P] words -> [N, K]
        if scheme.checkpoint_format == "gptq":  # undo v1's "zero point minus one", word-wise
            qzeros = qzeros.long() + v1_zero_offset(bits)  # a borrow the writer made is carried back
        zeros = unpack_words(qzeros, bits).t().contiguous()  # [G, N] -> [N, G]
    else:
        codes = unpack_words(qweight, bits, AWQ_ORDER).t().contiguous()  # [K, N] -> [N, K]
        zeros = unpack_words(qzeros, bits, AWQ_ORDER).t().contiguous()  # [G, N] -> [N, G]
    order = None
    if gptq and "g_idx" in tensors:
        order = _group_order(tensors["g_idx"], k, group_size, name)
        if order is not None:
            codes = codes[:, order]
    return UnpackedLayer(
        codes, _finite(scales.float().t().contiguous(), f"{name}.scales"), zeros, group_size, order, bits
    )


def _unpack_compressed_tensors(
    scheme: HubScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int, name: str
) -> UnpackedLayer:
    """compressed-tensors' layers hold q in -2^(bits-1)..2^(bits-1)-1 and w = s (q - zp), i.e.
    s (codes - zeros) with both offset by 2^(bits-1); weight_scale [N, G]:
    - pack-quantized: weight_packed int32 [N, K/P] holds inputs Pi..Pi+P-1 of row n at bits (bits j)
      as q + 2^(bits-1); weight_zero_point, asymmetric only, int32 [N/P, G] holding rows Pi..Pi+P-1
      likewise; weight_g_idx as GPTQ's g_idx.
    - int-quantized (8 bits): weight int8 [N, K] is q; weight_zero_point, asymmetric only, int8 [N, G].
    """
    n, k = shape
    bits, groups = scheme.bits, -(-k // group_size)
    per_word, mid = 32 // bits, 1 << (scheme.bits - 1)
    scales = tensors["weight_scale"]
    _check(scales, (n, groups), f"{name}.weight_scale", None)
    zeros = torch.full((n, groups), mid, dtype=torch.uint8)
    if scheme.checkpoint_format == INT_QUANTIZED:
        _check(tensors["weight"], (n, k), f"{name}.weight", torch.int8)
        codes = (tensors["weight"].to(torch.int16) + mid).to(torch.uint8)  # [N, K]
        if "weight_zero_point" in tensors:
            zero_points = tensors["weight_zero_point"]
            _check(zero_points, (n, groups), f"{name}.weight_zero_point", torch.int8)
            zeros = (zero_points.to(torch.int16) + mid).to(torch.uint8)
        return UnpackedLayer(
            codes, _finite(scales.float(), f"{name}.weight_scale"), zeros, group_size, None, 8
        )
    packed = tensors["weight_packed"]
    _check(packed, (n, k // per_word), f"{name}.weight_packed", torch.int32)
    stored_shape = tensors.get("weight_shape")
    if stored_shape is not None and stored_shape.tolist() != [n, k]:
        raise CheckpointError(
            f"{name}.weight_shape is {stored_shape.tolist()} but the model's layer is [{n}, {k}]; "
            "the config and the weights disagree"
        )
    codes = unpack_words(packed, bits)  # [N, K/P] words -> [N, K]
    if "weight_zero_point" in tensors:
        zero_points = tensors["weight_zero_point"]
        _check(zero_points, (n // per_word, groups), f"{name}.weight_zero_point", torch.int32)
        zeros = unpack_words(zero_points.t().contiguous(), bits).t().contiguous()  # [G, N/P] -> [N, G]
    order = None
    if "weight_g_idx" in tensors:
        order = _group_order(tensors["weight_g_idx"], k, group_size, name)
        if order is not None:
            codes = codes[:, order]
    scales = _finite(scales.float(), f"{name}.weight_scale")
    return UnpackedLayer(codes, scales, zeros, group_size, order, bits)


def _finite(scales: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(scales).all():
        raise CheckpointError(f"{name} holds NaN or infinite values; the checkpoint is damaged")
    return scales


def _check(t: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None) -> None:
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        raise CheckpointError(
            f"tensor {name} is {t.dtype} {tuple(t.shape)} but the layer needs "
            f"{dtype or 'float'} {shape}; the config and the weights disagree"
        )


def _group_order(g_idx: torch.Tensor, k: int, group_size: int, name: str) -> torch.Tensor | None:
    """None when g_idx is k // group_size (groups of adjacent inputs), else the input order that
    makes every group's inputs adjacent (GPTQ act-order). Groups must hold group_size inputs each
    (the last one the rest), as GPTQ writes them."""
    _check(g_idx, (k,), f"{name}.g_idx", None)
    g_idx, adjacent = g_idx.long(), torch.arange(k) // group_size
    if torch.equal(g_idx, adjacent):
        return None
    if not torch.equal(g_idx.sort().values, adjacent):
        raise CheckpointError(
            f"tensor {name}.g_idx does not put {group_size} inputs in each group; the checkpoint is damaged"
        )
    return torch.argsort(g_idx, stable=True)


def build_linear(layer: UnpackedLayer, bias: torch.Tensor | None, native: bool) -> QuantizedLinear:
    """The runtime layer: a `BlockQuantLinear` on the native kernel (`native`: it runs here and the
    shape fits its tiles), else an `Int4Linear` (4 bits) or `Int8Linear` / `HalfLinear` (8 bits);
    wrapped to reorder its inputs where `layer.order` says."""
    n, k = layer.codes.shape
    if native and fits(n, k):
        d = layer.per_block(layer.scales, BLOCK)  # [N, K/32]
        symmetric_format, asymmetric_format = ("Q4_0", "Q4_1") if layer.bits == 4 else ("Q8_0", "Q8_M")
        if layer.symmetric:  # w = s (q - 2^(bits-1)): Q4_0 / Q8_0 exactly
            built: QuantizedLinear = BlockQuantLinear.from_blocks(symmetric_format, layer.codes, d, bias=bias)
        else:  # w = s (q - offset) + s (offset - z): m = s (offset - z), offset 0 (Q4_1) or 128 (Q8_M)
            offset = BlockQuantLinear.formats[asymmetric_format][1]
            m = d * (offset - layer.per_block(layer.zeros, BLOCK).float())  # [N, K/32]
            built = BlockQuantLinear.from_blocks(asymmetric_format, layer.codes, d, m, bias=bias)
    elif layer.bits == 8 and layer.symmetric and layer.group_size == k:  # a scale per output row
        q = (layer.codes.to(torch.int16) - 128).to(torch.int8)  # [N, K]
        built = Int8Linear(q, layer.scales[:, 0], bias)
    elif layer.bits == 8:  # groups, or zero points: no int8 layout here holds them
        return half_linear(layer.dequantize(), bias)
    else:
        # the layer's group size, or the largest that divides it and K (576 wide at 128: 64)
        group = max(g for g in GROUP_SIZES if layer.group_size % g == 0 and k % g == 0)
        s = layer.per_block(layer.scales, group)  # [N, K/group]
        z = s * (8 - layer.per_block(layer.zeros, group).float())  # w = (q - 8) s + z
        built = Int4Linear(layer.codes, make_scales_and_zeros(s, z), group, bias)
    return built if layer.order is None else ReorderedInputLinear(built, layer.order)


class ReorderedInputLinear(nn.Module):
    """A quantized linear whose inputs were reordered so each group's are adjacent (GPTQ act-order):
    x's columns are gathered into that order, then the inner layer runs. Loaded only: it is not a
    `QuantizedLinear` of its own, and `save_quantized` refuses a model holding one."""

    def __init__(self, inner: QuantizedLinear, order: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.inner = inner
        self.register_buffer("order", order)

    @classmethod
    def concatenate(cls, layers: list[nn.Module]) -> ReorderedInputLinear | None:
        """Layers with one input order (q/k/v of one act-order layer share their Hessian, so their
        order) merge through their inner layers' `concatenate`."""
        first = layers[0]
        if not all(type(layer) is cls and torch.equal(layer.order, first.order) for layer in layers):
            return None
        inner = type(first.inner).concatenate([layer.inner for layer in layers])
        return None if inner is None else cls(inner, first.order)

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize()[:, self.order.argsort().to(self.order.device)]

    def native_blocks(self) -> Blocks | None:
        """The inner layer's native blocks, for the native decoder layer, which gathers x by
        `native_order` first (None with a bias: that layer takes bias-free projections)."""
        blocks = getattr(self.inner, "native_blocks", None)
        return None if blocks is None or self.inner.bias is not None else blocks()

    def native_order(self) -> torch.Tensor:
        """The gather the native decoder layer applies to x before the blocks: int64 [K]."""
        return self.order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.order))
