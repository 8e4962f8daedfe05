"""FP8 checkpoints: transformers' FineGrainedFP8 (`quant_method` fp8: `NAME.weight` in float8 e4m3 with
`NAME.weight_scale_inv`, one float32 per `weight_block_size` block) and compressed-tensors'
float-quantized (`NAME.weight` e4m3 with `NAME.weight_scale` per output channel, per tensor or per
block; a static `NAME.input_scale` is read and left unused).

The weight is w = e4m3 value * its block's scale. Where Lamina's native CPU kernels run, each layer
stays so, an `Fp8Linear` (`fp8.py`: the e4m3 bytes and their scales as stored, each byte widened
exactly as the kernel loads it). Elsewhere (CUDA, CPUs without the kernels) it becomes a `HalfLinear`:
w rounded once to float16 (11 significant bits, against FP8's 4: within 2^-11 of the stored value;
bfloat16 where float16 would overflow), 2 bytes a weight. Activations stay float32 either way (the
checkpoint's FP8 activation quantization is not applied, as on GPUs without FP8 arithmetic).
"""

from __future__ import annotations

import torch

from lamina.errors import CheckpointError
from lamina.quant.fp8 import E4M3, E4M3_MAX, Fp8Linear
from lamina.quant.half import HalfLinear, half_linear
from lamina.quant.hub_scheme import FP8, HubScheme


def fp8_parts(scheme: HubScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor name suffixes of an FP8 layer; the first names its layers."""
    scale = "weight_scale_inv" if scheme.method == FP8 else "weight_scale"
    return (scale, "weight"), ("input_scale",)


def fp8_linear(
    scheme: HubScheme,
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    name: str,
    bias: torch.Tensor | None,
    native: bool,
) -> Fp8Linear | HalfLinear:
    """The layer for one FP8 layer's tensors (`fp8_parts`); `shape` is the model's [N, K]. `native`: the
    native CPU kernels run where the layer goes, so it can stay FP8."""
    n, k = shape
    scale_name = fp8_parts(scheme)[0][0]
    weight, scale = tensors["weight"], tensors[scale_name].float()
    if weight.dtype != E4M3 or tuple(weight.shape) != (n, k):
        raise CheckpointError(
            f"tensor {name}.weight is {weight.dtype} {tuple(weight.shape)} but an fp8 layer needs {E4M3} "
            f"{(n, k)}; the config and the weights disagree"
        )
    layer = Fp8Linear(weight, *_block_scales(scale, scheme, (n, k), f"{name}.{scale_name}"), bias)
    # checked on the codes and scales: the float weight is only built for the 16-bit fallback
    nan_codes = (weight.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn's only non-finite codes
    if nan_codes.any() or not torch.isfinite(layer.scales * E4M3_MAX).all():
        raise CheckpointError(
            f"{name}'s fp8 weights or scales hold NaN or infinite values; the checkpoint is damaged"
        )
    return layer if native and layer.native_e4m3() is not None else half_linear(layer.dequantize(), bias)


def _block_scales(
    scale: torch.Tensor, scheme: HubScheme, shape: tuple[int, int], name: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(Scales [R, C], the (rows, columns) block each covers): per block, per output channel ([N] or
    [N, 1]), or one for the tensor."""
    n, k = shape
    if scheme.weight_block is not None:
        rows, cols = scheme.weight_block
        blocks = (-(-n // rows), -(-k // cols))
        if tuple(scale.shape) != blocks:
            raise CheckpointError(
                f"tensor {name} is {tuple(scale.shape)} but {rows}x{cols} blocks of a {[n, k]} layer need "
                f"{blocks}; the config and the weights disagree"
            )
        return scale, (rows, cols)
    if scale.numel() == 1:
        return scale.reshape(1, 1), (n, k)
    if scale.numel() == n and scale.dim() <= 2 and scale.shape[0] == n:
        return scale.reshape(n, 1), (1, k)
    raise CheckpointError(
        f"tensor {name} is {tuple(scale.shape)}, neither one scale per output channel ({n}) nor one for "
        "the tensor; the config and the weights disagree"
    )
