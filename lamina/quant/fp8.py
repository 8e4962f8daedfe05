"""Float8 e4m3 weights with float32 scales, float32 arithmetic: FP8 checkpoints kept at 8 bits, and
`--quantize fp8`.

FP8 checkpoints (transformers' fp8, compressed-tensors' float-quantized; read by `fp8_format.py`) store
each weight as an e4m3 byte times a float32 scale per output channel, per tensor or per block of rows
and columns. CPUs have no FP8 arithmetic, but a decode step is bound by reading the weights: the native
kernel (`kernels/dense.c`) widens each byte exactly to float as it loads it (placed into an fp16, one
shift and mask) and multiplies each block's sum by its scale, so a layer is read at one byte a weight
and computes the float32 product of its dequantized weight (in its own summation order). Other calls
(prompts, other devices, CPUs without the kernels) widen the weight for the call: correct, slower.

`--quantize fp8` scales each output row so its largest |w| is e4m3's largest value, 448, and rounds
to the nearest e4m3 value (3 mantissa bits: within 2^-4 of each weight), as vLLM's dynamic FP8 does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import CheckpointError
from lamina.kernels import native
from lamina.models.native_linear import NATIVE_ROWS
from lamina.quant.base import QuantizedLinear, check_shape, field_problem, require_tensors

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
KERNEL_STEP = 16  # the kernel reads 16 weights at a time: K and the scale blocks' width are multiples


class Fp8Linear(QuantizedLinear):
    """A linear whose weight is float8 e4m3 [N, K] times float32 scales, one per `scale_block` (rows,
    columns) block: [ceil(N / rows), ceil(K / columns)]."""

    method = "fp8"

    def __init__(
        self,
        weight8: torch.Tensor,
        scales: torch.Tensor,
        scale_block: tuple[int, int],
        bias: torch.Tensor | None = None,
    ) -> None:
        out_features, in_features = weight8.shape
        super().__init__(in_features, out_features, bias)
        rows, cols = scale_block
        if tuple(scales.shape) != (-(-out_features // rows), -(-in_features // cols)):
            raise ValueError(
                f"scales {tuple(scales.shape)} do not cover [{out_features}, {in_features}] in {scale_block} blocks"
            )
        self.scale_block = (rows, cols)
        self.register_buffer("weight8", weight8.contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, **opts: Any) -> Fp8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(
            min=torch.finfo(torch.float32).tiny
        )  # [N, 1]
        return cls((w / scales).to(E4M3), scales, (1, w.shape[1]), linear.bias)

    @classmethod
    def config_problem(cls, config: dict[str, Any]) -> str | None:
        def two_sizes(value: Any) -> bool:
            return (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            )

        return super().config_problem(config) or field_problem(
            config, "scale_block", two_sizes, "not two positive sizes"
        )

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> Fp8Linear:
        where = config.get("name", "?")
        weight, scales = require_tensors(tensors, ("weight", "scales"), where)
        rows, cols = config["scale_block"]
        check_shape(weight, (out_features, in_features), "weight", where)
        check_shape(scales, (-(-out_features // rows), -(-in_features // cols)), "scales", where)
        if weight.dtype != E4M3:
            raise CheckpointError(
                f"quantized layer {where}: tensor weight is {weight.dtype}, not {E4M3}; the checkpoint and its "
                "quant_config.json do not match, re-run `lamina quantize`"
            )
        return cls(weight, scales, (rows, cols), tensors.get("bias"))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight8.cpu(), "scales": self.scales.cpu()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def scheme_config(self) -> dict[str, Any]:
        return {"method": self.method, "scale_block": list(self.scale_block)}

    def weight_scales(self) -> torch.Tensor:
        """Each weight's scale, float32 [N, K]."""
        rows, cols = self.scale_block
        n, k = self.out_features, self.in_features
        return self.scales.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]

    def dequantize(self) -> torch.Tensor:
        return self.weight8.float() * self.weight_scales()

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> Fp8Linear | None:
        """Stack the layers' rows: their scale blocks as they are where every layer but the last ends on
        a block boundary, else widened to a scale per row."""
        if not cls.alike(layers, lambda layer: (layer.in_features, layer.scale_block)):
            return None
        rows, cols = layers[0].scale_block
        if all(layer.out_features % rows == 0 for layer in layers[:-1]):
            scales = torch.cat([layer.scales for layer in layers])  # [sum of row blocks, column blocks]
        else:
            scales = torch.cat(
                [layer.scales.repeat_interleave(rows, 0)[: layer.out_features] for layer in layers]
            )
            rows = 1
        weight8 = torch.cat([layer.weight8 for layer in layers])
        return cls(weight8, scales, (rows, cols), cls.concatenated_bias(layers))

    def native_e4m3(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None:
        """(codes as uint8 [N, K], scales, scale block) for the native kernel, or None where it does not
        run: CPUs without the kernels, other devices, widths that are not multiples of 16."""
        if (
            native.library() is None
            or self.weight8.device.type != "cpu"
            or self.in_features % KERNEL_STEP
            or self.scale_block[1] % KERNEL_STEP
        ):
            return None
        return self.weight8.view(torch.uint8), self.scales, self.scale_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.native_e4m3()
        if (
            kernel is not None
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() <= NATIVE_ROWS * self.in_features
            and not torch.compiler.is_compiling()
        ):
            bias = None if self.bias is None else self.bias.float()
            y = native.e4m3_linear(
                x.reshape(-1, self.in_features).contiguous(), *kernel, bias
            )  # [..., K] -> [M, K]
            return y.view(*x.shape[:-1], self.out_features)  # [M, N] -> [..., N]
        return F.linear(
            x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )
