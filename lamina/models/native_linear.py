"""Float32 linear layers whose decode-sized products run on Lamina's CPU kernel (`dense.c`).

torch's float32 mat-vec reads weights at ~11 GB/s on the 2-core machines here; the kernel at
~21 GB/s (benchmarks/NOTES.md, finding 16), which is what a float32 model's decode step is made of.
`attach_native_linears` turns each plain `nn.Linear` into a `NativeLinear` by changing its class
in place: the parameters, hooks (weight streaming binds tensors through them) and the module's
identity stay as they are. Inputs of more than NATIVE_ROWS rows (prompts), other dtypes and
devices, and traced calls take `nn.Linear.forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from lamina.kernels import native

#: Rows (tokens) up to which a product runs on the kernel: decode steps and verify passes.
NATIVE_ROWS = 16


def native_dense_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """x [..., K] @ weight [N, K]^T + bias on the kernel (float32 x and bias; a weight it takes, see
    `native.dense_kernel_takes`), or None where the call does not qualify: more than NATIVE_ROWS
    rows, other dtypes or devices, a traced call. Needs `native.library()`."""
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.numel() > NATIVE_ROWS * weight.shape[1]
        or not native.dense_kernel_takes(weight)
        or (bias is not None and bias.dtype != torch.float32)
        or torch.compiler.is_compiling()
    ):
        return None
    y = native.dense_linear(x.reshape(-1, weight.shape[1]).contiguous(), weight, bias)  # [..., K] -> [M, K]
    return y.view(*x.shape[:-1], weight.shape[0])  # [M, N] -> [..., N]


class NativeLinear(nn.Linear):
    """An `nn.Linear` that multiplies a few float32 rows on the CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native_dense_product(x, self.weight, self.bias)
        return super().forward(x) if y is None else y


def attach_native_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `NativeLinear` when the kernels run here; returns how many."""
    if native.library() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
            count += 1
    return count
