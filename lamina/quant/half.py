"""16-bit weights, float32 arithmetic: `--quantize bf16` / `fp16`.

Most Hugging Face checkpoints store bfloat16 (or float16) weights. Run in float32 they take twice
their stored size, and a decode step, which reads every weight once, moves twice the bytes; run in
bfloat16 the activations lose precision too, and on CPUs without native bfloat16 arithmetic it is
slow. `HalfLinear` keeps the weight in 16 bits and computes in the activations' dtype: for a few
float32 rows on the CPU (decode steps), the native mat-vec widens each weight as it loads it
(`kernels/dense.c`), so the product is exactly the float32 one of the widened weight; elsewhere the
weight is widened for the call (`F.linear`). Nothing is rounded for a checkpoint already stored in
that format; from float32 weights, each is rounded to nearest (bfloat16: 8 significant bits, float16:
11, with float16 saturating beyond 65504). A GGUF's F16 / BF16 matrices are kept as they are too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lamina.kernels import native
from lamina.loading.gguf_layout import RowOrder
from lamina.models.native_linear import native_dense_product
from lamina.quant.base import QuantizedLinear, check_shape, require_tensors

#: `--quantize` method -> the storage dtype.
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: GGML types stored in 16 bits -> the dtype a `HalfLinear` keeps them in.
GGML_HALF_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def half_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> HalfLinear:
    """A float weight [N, K] rounded once to float16 (11 significant bits), or to bfloat16 where float16
    would overflow: for checkpoints whose stored layout no quantized layer here holds."""
    fits_fp16 = weight.abs().max() <= torch.finfo(torch.float16).max
    return HalfLinear(weight.to(torch.float16 if fits_fp16 else torch.bfloat16), bias)


def half_linear_from_gguf(
    data: np.ndarray, ggml_type: str, shape: tuple[int, int], permute_rows: RowOrder | None = None
) -> HalfLinear:
    """A GGUF F16 / BF16 matrix [N, K] as a `HalfLinear`, its bits as stored, output rows reordered by
    `permute_rows`."""
    bits = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy())  # the 16-bit words
    weight = bits.view(GGML_HALF_DTYPES[ggml_type]).reshape(shape)  # [N * K] -> [N, K]
    return HalfLinear(weight if permute_rows is None else permute_rows(weight))


class HalfLinear(QuantizedLinear):
    """A linear whose weight is stored in bfloat16 or float16 (`method` bf16 or fp16)."""

    def __init__(self, weight16: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """`weight16`: [out_features, in_features], bfloat16 or float16."""
        super().__init__(weight16.shape[1], weight16.shape[0], bias)
        self.method = next(m for m, dtype in HALF_DTYPES.items() if dtype == weight16.dtype)
        self.register_buffer("weight16", weight16.contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str = "bf16", **opts: Any) -> HalfLinear:
        return cls(linear.weight.detach().to(HALF_DTYPES[method]), linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> HalfLinear:
        where = config.get("name", "?")
        (weight,) = require_tensors(tensors, ("weight",), where)
        check_shape(weight, (out_features, in_features), "weight", where)
        return cls(weight.to(HALF_DTYPES[config["method"]]), tensors.get("bias"))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight16.cpu()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantize(self) -> torch.Tensor:
        return self.weight16.float()

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> HalfLinear | None:
        """Stack the weights along the outputs (exact)."""
        if not cls.alike(layers, lambda layer: layer.weight16.dtype):
            return None
        weight = torch.cat([layer.weight16 for layer in layers])  # [sum N, K]
        return cls(weight, cls.concatenated_bias(layers))

    def native_dense(self) -> torch.Tensor | None:
        """The 16-bit weight the native kernels read, or None where they cannot (off the CPU, a width
        not a multiple of 16, no kernels here)."""
        weight = self.weight16
        if weight.device.type != "cpu" or not native.dense_kernel_takes(weight) or native.library() is None:
            return None
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.native_dense() is None else native_dense_product(x, self.weight16, self.bias)
        if y is not None:
            return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight16.to(x.dtype), bias)


class HalfEmbedding(nn.Module):
    """A token embedding whose table stays in bfloat16 or float16: looked-up rows are widened to the
    model's activation dtype (exact). A tied output head is a `HalfLinear` over the same tensor."""

    def __init__(self, weight16: torch.Tensor) -> None:
        """`weight16`: [num_embeddings, embedding_dim], bfloat16 or float16."""
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight16.shape
        self.register_buffer("weight16", weight16.contiguous())
        self.output_dtype = torch.float32  # the model's activation dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight16).to(self.output_dtype)  # [..., embedding_dim]

    def dequantize(self) -> torch.Tensor:
        """The float32 table [num_embeddings, embedding_dim]."""
        return self.weight16.float()
