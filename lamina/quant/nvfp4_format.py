"""compressed-tensors' NVFP4 checkpoints (`nvfp4-pack-quantized`: llm-compressor's NVFP4A16 and NVFP4),
loaded as stored. A quantized linear `NAME` holds `NAME.weight_packed` (uint8 [N, K/2], two E2M1 codes a
byte, input 2i in the low nibble; bit 3 of a code is the sign, bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4,
6), `NAME.weight_scale` (float8 e4m3 [N, K/16]) and `NAME.weight_global_scale` (float32 [1]):
w = e2m1 value * weight_scale / global_scale.

On the native CPU kernel a layer becomes `BlockQuantLinear` NVFP4 blocks, the format GGUF's NVFP4 uses:
the codes as stored (its code book holds twice the E2M1 values, in the same order), d = weight_scale /
global_scale / 2 per 16 weights, rounded to fp16 (within 2^-11 of it). Elsewhere, or where fp16 cannot
hold d, the layer is 16-bit weights. NVFP4's FP4 activations are not applied (activations stay float32).
"""

from __future__ import annotations

import torch

from lamina.errors import CheckpointError
from lamina.quant.base import QuantizedLinear
from lamina.quant.blockq import CODE_BOOKS, BlockQuantLinear
from lamina.quant.blocks import fits, fp16_holds
from lamina.quant.half import half_linear
from lamina.quant.hub_scheme import NVFP4_GROUP

#: (required, optional) tensor name suffixes of one layer; the first names the quantized layers.
NVFP4_PARTS = (("weight_packed", "weight_scale", "weight_global_scale"), ())


def nvfp4_linear(
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    name: str,
    bias: torch.Tensor | None,
    native: bool,
) -> QuantizedLinear:
    """The layer for one NVFP4 layer's tensors (`NVFP4_PARTS`); `shape` is the model's [N, K]; `native`:
    the native CPU kernels run where the layer goes."""
    n, k = shape
    packed, scale, global_scale = (tensors[part] for part in NVFP4_PARTS[0])
    expected = {
        "weight_packed": (packed, torch.uint8, (n, k // 2)),
        "weight_scale": (scale, torch.float8_e4m3fn, (n, k // NVFP4_GROUP)),
        "weight_global_scale": (global_scale, torch.float32, (1,)),
    }
    for part, (t, dtype, part_shape) in expected.items():
        if k % NVFP4_GROUP or t.dtype != dtype or tuple(t.shape) != part_shape:
            raise CheckpointError(
                f"tensor {name}.{part} is {t.dtype} {tuple(t.shape)} but an nvfp4 layer of [{n}, {k}] needs "
                f"{dtype} {part_shape}; the config and the weights disagree"
            )
    d = scale.float() / global_scale / 2  # [N, K/16]: the book holds 2x the E2M1 values
    if not torch.isfinite(d).all():
        raise CheckpointError(
            f"{name}'s nvfp4 scales hold NaN or infinite values (or a zero global scale); the checkpoint is damaged"
        )
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, k)  # [N, K/2, 2] -> [N, K]
    if native and fits(n, k) and fp16_holds(d):
        return BlockQuantLinear.from_blocks("NVFP4", codes, d, bias=bias)
    book = torch.tensor(CODE_BOOKS["NVFP4"], dtype=torch.float32)
    return half_linear(book[codes.long()] * d.repeat_interleave(NVFP4_GROUP, dim=1), bias)  # [N, K]
