"""LLM.int8() (Dettmers et al. 2022): int8 x int8 matmul with float outlier columns.

Weights: symmetric int8 with one scale per output row (as for `int8`). At run time the activation
columns (input features) where any |x| >= threshold (default 6.0) go through a float matmul against
those weight columns (dequantized from int8, as bitsandbytes does); every other column is quantized
per activation row (absmax / 127) to int8, multiplied int8 x int8 -> int32 with `torch._int_mm`, and
rescaled by row scale x column scale. Outliers are few but large; keeping them float is what keeps
perplexity near the float model's while most of the work stays int8.

Kernels: on CPU, `use_native_blocks` moves the weight into Lamina's native block tiles (`tile_int8`,
as `int8` does: row scales in fp16) and one native call (`kernels/llm_int8.c`) does the whole layer:
it finds the outlier columns, quantizes the rest per row and runs the int8 activation, as float
(codes x row scale), through the block kernel, whose own block-wise requantization holds it to
2^-15 of each block's range, so the product is the int8 x int8 one to float rounding; then it adds
the outlier columns' float products. A native decoder layer (`models/native_layer.py`) calls the
same code. Elsewhere (CUDA, no native kernels) the same steps run as torch ops, the int8 product on
`torch._int_mm` (CUDA for more than 16 rows) or a float matmul of the int8 values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamina.kernels import native
from lamina.quant.base import QuantizedLinear, check_shape, field_problem, require_tensors
from lamina.quant.int8 import TiledInt8Weight, quantize_per_channel

DEFAULT_THRESHOLD = 6.0


class LLMInt8Linear(TiledInt8Weight, QuantizedLinear):
    """LLM.int8() linear: int8 weights, mixed int8 / float activations. Once repacked its
    `native_blocks()` come with `native_outliers()`, which a native decoder layer must honour."""

    method = "llm.int8"
    compiles = False  # which columns are outliers depends on the data (measured on an H200: a graph break)

    def __init__(
        self, weight_q: torch.Tensor, scales: torch.Tensor, threshold: float, bias: torch.Tensor | None
    ) -> None:
        out_features, in_features = weight_q.shape
        super().__init__(in_features, out_features, bias)
        self.threshold = threshold
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # the native block layout, set by `use_native_blocks` (it then replaces weight_q)
        self.register_buffer("codes_tiled", None, persistent=False)
        self.register_buffer("d_tiled", None, persistent=False)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, **opts: Any
    ) -> LLMInt8Linear:
        q, s = quantize_per_channel(linear.weight)
        return cls(q, s, threshold, linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LLMInt8Linear:
        where = config.get("name", "?")
        q, s = require_tensors(tensors, ("weight_q", "scales"), where)
        check_shape(q, (out_features, in_features), "weight_q", where)
        check_shape(s, (out_features,), "scales", where)
        return cls(
            q.to(torch.int8), s, float(config.get("threshold", DEFAULT_THRESHOLD)), tensors.get("bias")
        )

    @classmethod
    def config_problem(cls, config: dict[str, Any]) -> str | None:
        """Besides the base checks: `threshold`, where given, a number above 0 (the activation
        magnitude from which a column is an outlier)."""
        return super().config_problem(config) or field_problem(
            config, "threshold", _is_positive_number, "not a number above 0", required=False
        )

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> LLMInt8Linear | None:
        """Stack the layers' rows and row scales, when they share input width, threshold and device: the
        same input has the same outlier columns and row scales, so the merged layer computes each
        layer's output exactly."""
        if not cls.alike(layers, lambda layer: (layer.in_features, layer.threshold, layer.scales.device)):
            return None
        first = layers[0]
        weight_q = torch.cat([layer.int8_weight() for layer in layers])  # [sum N, K]
        scales = torch.cat([layer.scales for layer in layers])  # [sum N]
        return cls(weight_q, scales, first.threshold, cls.concatenated_bias(layers))

    def scheme_config(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight_q": self.int8_weight().cpu(), "scales": self.scales.cpu()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantize(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]

    def native_outliers(self) -> tuple[torch.Tensor, float]:
        """(row scales float32 [N], threshold): what the native kernel needs besides `native_blocks()`
        to split off the outlier columns."""
        return self.scales, self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # [M, K]
        blocks = self.native_blocks()
        if blocks is not None:
            matmul = llm_int8_matmul if torch.compiler.is_compiling() else native.llm_int8_matmul
            y = matmul(x2.contiguous(), self.codes_tiled, self.d_tiled, self.scales, self.threshold)  # [M, N]
            return self._add_bias(y.to(x.dtype).reshape(*shape[:-1], self.out_features))  # [..., N]
        outlier = (x2.abs() >= self.threshold).any(dim=0)  # [K] columns routed through float
        x_in = x2.masked_fill(outlier, 0.0)
        row_scale = x_in.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # [M, 1]
        xq = torch.round(x_in / row_scale).to(torch.int8)  # [M, K]
        y = _int8_matmul(xq, self.weight_q) * row_scale * self.scales  # [M, N]
        if outlier.any():
            cols = outlier.nonzero().squeeze(1)
            w_out = self.weight_q[:, cols].float() * self.scales[:, None]  # [N, n_outliers]
            y = y + x2[:, cols] @ w_out.t()
        return self._add_bias(y.to(x.dtype).reshape(*shape[:-1], self.out_features))  # [..., N]


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0  # NaN fails too


@torch.library.custom_op("lamina::llm_int8_matmul", mutates_args=())
def llm_int8_matmul(
    x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, scales: torch.Tensor, threshold: float
) -> torch.Tensor:
    """`native.llm_int8_matmul` as an op the compiler keeps opaque (a compiled decode step calls it)."""
    return native.llm_int8_matmul(x, codes, d, scales, threshold)


@llm_int8_matmul.register_fake
def _llm_int8_matmul_shape(
    x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, scales: torch.Tensor, threshold: float
) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0])


def _int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> float32 [M, N] (exact int32 sums)."""
    m, k = xq.shape
    if xq.device.type == "cpu" or (m > 16 and k % 8 == 0 and wq.shape[0] % 8 == 0):
        return torch._int_mm(xq, wq.t()).float()
    # CUDA's _int_mm wants M > 16 and multiples of 8; small decode batches use a float matmul of the
    # int8 values (exact while K * 127^2 < 2^24, i.e. K <= 1040; beyond that rounding is ~2^-24 relative).
    return xq.float() @ wq.float().t()
