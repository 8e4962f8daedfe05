"""compressed-tensors' FP4 checkpoints, loaded as stored: `nvfp4-pack-quantized` (llm-compressor's NVFP4A16
and NVFP4) and `mxfp4-pack-quantized` (MXFP4A16 and MXFP4). A quantized linear `NAME` holds
`NAME.weight_packed` (uint8 [N, K/2], two E2M1 codes a byte, input 2i in the low nibble; bit 3 of a code
is the sign, bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6) and `NAME.weight_scale`:
- NVFP4: float8 e4m3 [N, K/16] and `NAME.weight_global_scale` float32 [1]:
  w = e2m1 value * weight_scale / global_scale;
- MXFP4: uint8 [N, K/32], E8M0 exponents: w = e2m1 value * 2^(weight_scale - 127).

On the native CPU kernel a layer becomes `BlockQuantLinear` blocks of the format GGUF's NVFP4 / MXFP4
use: the codes as stored (the formats' code book holds twice the E2M1 values, in the same order), d =
the scale / 2 per 16 (32) weights in fp16: within 2^-11 for NVFP4, exact for MXFP4's powers of two.
Elsewhere, or where fp16 cannot hold d, the layer is 16-bit weights. FP4 activations are not applied
(activations stay float32).
"""

from __future__ import annotations

import torch

from lamina.errors import CheckpointError
from lamina.quant.base import QuantizedLinear
from lamina.quant.blockq import CODE_BOOKS, BlockQuantLinear
from lamina.quant.blocks import fits, fp16_holds
from lamina.quant.half import half_linear
from lamina.quant.hub_scheme import NVFP4_PACKED, HubScheme

E8M0_BIAS = 127


def fp4_parts(scheme: HubScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor name suffixes of one layer; the first names the quantized layers."""
    if scheme.checkpoint_format == NVFP4_PACKED:
        return ("weight_packed", "weight_scale", "weight_global_scale"), ()
    return ("weight_packed", "weight_scale"), ()


def fp4_linear(
    scheme: HubScheme,
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    name: str,
    bias: torch.Tensor | None,
    native: bool,
) -> QuantizedLinear:
    """The layer for one FP4 layer's tensors (`fp4_parts`); `shape` is the model's [N, K]; `native`: the
    native CPU kernels run where the layer goes."""
    n, k = shape
    group = scheme.group_size
    nvfp4 = scheme.checkpoint_format == NVFP4_PACKED
    expected = {
        "weight_packed": (torch.uint8, (n, k // 2)),
        "weight_scale": (torch.float8_e4m3fn if nvfp4 else torch.uint8, (n, k // group)),
        **({"weight_global_scale": (torch.float32, (1,))} if nvfp4 else {}),
    }
    for part, (dtype, part_shape) in expected.items():
        t = tensors[part]
        if k % group or t.dtype != dtype or tuple(t.shape) != part_shape:
            raise CheckpointError(
                f"tensor {name}.{part} is {t.dtype} {tuple(t.shape)} but a {group}-group fp4 layer of "
                f"[{n}, {k}] needs {dtype} {part_shape}; the config and the weights disagree"
            )
    scale = tensors["weight_scale"]
    if nvfp4:
        per_group = scale.float() / tensors["weight_global_scale"]  # [N, K/16]
    else:
        per_group = torch.exp2(scale.float() - E8M0_BIAS)  # [N, K/32]: powers of two, exact
    d = per_group / 2  # the code book holds 2x the E2M1 values
    if not torch.isfinite(d).all():
        raise CheckpointError(
            f"{name}'s fp4 scales hold NaN or infinite values (or a zero global scale); the checkpoint is damaged"
        )
    packed = tensors["weight_packed"]
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, k)  # [N, K/2, 2] -> [N, K]
    block_format = "NVFP4" if nvfp4 else "MXFP4"
    if native and fits(n, k) and fp16_holds(d):
        return BlockQuantLinear.from_blocks(block_format, codes, d, bias=bias)
    book = torch.tensor(CODE_BOOKS[block_format], dtype=torch.float32)
    return half_linear(book[codes.long()] * d.repeat_interleave(group, dim=1), bias)  # [N, K]
