"""Weight-only int8, symmetric, one scale per output channel.

Quantization: s[n] = max_k |W[n, k]| / 127, q = round(W / s) in [-127, 127]; round-trip error per
element is at most s[n] / 2.

Kernel: `aten._weight_int8pack_mm(x, q, s)` on CPU and CUDA. On CPU it is fast only with bfloat16
activations (measured on torch 2.13, 1536x576, one token: ~26 us in bf16 vs ~430 us in float32, the
float32 path being slower than a dense float32 matmul), so `forward` casts x to bfloat16 around the
kernel and casts the result back. Effect on accuracy: x is rounded to 8 mantissa bits (relative
error <= 2^-8 per element) and the output to bf16; accumulation inside the kernel is float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamina.kernels import native
from lamina.quant.base import QuantizedLinear, check_shape, require_tensors
from lamina.quant.blocks import Blocks, blocks_forward, fits, tile_codes, tile_scales, untile_codes

#: Activation dtype the int8 kernel is called with (see module docstring).
KERNEL_DTYPE = torch.bfloat16
ROW_CHUNK = 4096


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K], scales float32 [N]).

    Works through rows in chunks so float temporaries stay small next to a large (embedding-sized) weight.
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        w = weight[start : start + ROW_CHUNK].detach().float()  # [<=ROW_CHUNK, K]
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[start : start + ROW_CHUNK] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[start : start + ROW_CHUNK] = s
    return q, scales


def tile_int8(weight_q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row int8 in the native block layout: (codes q + 128 tiles, each row's scale as every block's
    d in fp16, rounded to 11 significant bits), or None where the kernel does not run here or fp16
    cannot hold a scale."""
    n, k = weight_q.shape
    if weight_q.device.type != "cpu" or not fits(n, k) or native.library() is None:
        return None
    fp16 = torch.finfo(torch.float16)
    if scales.min() < fp16.smallest_normal or scales.max() > fp16.max:
        return None
    codes = tile_codes(weight_q.view(torch.uint8) ^ 0x80, 8)  # q -> q + 128
    return codes, tile_scales(scales[:, None].expand(n, k // 32))


def untile_int8(codes_tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int8`'s codes: q int8 [N, K]."""
    return (untile_codes(codes_tiled.cpu(), 8) ^ 0x80).view(torch.int8)  # q + 128 -> q


class TiledInt8Weight:
    """Per-row int8 `weight_q` + `scales` that `use_native_blocks` moves into the native block tiles
    (`codes_tiled`, `d_tiled`, replacing `weight_q`); shared by `Int8Linear` and `LLMInt8Linear`."""

    weight_q: torch.Tensor | None
    scales: torch.Tensor
    codes_tiled: torch.Tensor | None
    d_tiled: torch.Tensor | None

    def int8_weight(self) -> torch.Tensor:
        """q int8 [N, K], whatever the runtime layout."""
        return self.weight_q if self.codes_tiled is None else untile_int8(self.codes_tiled)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """After a move (`.to`, `.cuda`): tiles that left the CPU, where the native kernel runs, go back
        to the plain `weight_q` the torch kernels take."""
        module = super()._apply(fn, recurse)  # type: ignore[misc]
        tiles = self.codes_tiled
        if tiles is not None and tiles.device.type not in ("cpu", "meta"):
            self.weight_q = untile_int8(tiles).to(tiles.device)
            self.codes_tiled = self.d_tiled = None
        return module

    def use_native_blocks(self) -> bool:
        """Repack with `tile_int8` (row scales to fp16's 11 bits; the torch kernel rounds them to bf16's
        8). Returns whether the layer now uses the tiles; layers whose scales fp16 cannot hold, or off
        the CPU, keep the torch path."""
        tiled = None if self.codes_tiled is not None else tile_int8(self.weight_q, self.scales)
        if tiled is None:
            return False
        self.codes_tiled, self.d_tiled = tiled
        self.weight_q = None
        return True

    def native_blocks(self) -> Blocks | None:
        """The `Blocks` the native kernels take, or None off the block layout."""
        if self.codes_tiled is None or self.codes_tiled.device.type != "cpu":
            return None
        return self.codes_tiled, self.d_tiled, None, 8, 128, None


class Int8Linear(TiledInt8Weight, QuantizedLinear):
    """Per-channel weight-only int8 linear."""

    method = "int8"

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        out_features, in_features = weight_q.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # The kernel takes its scales in the activation dtype: convert once, not on every call
        # (a per-call conversion also keeps inductor from compiling the kernel call).
        self.register_buffer("kernel_scales", self.scales.to(KERNEL_DTYPE), persistent=False)
        # the native block layout, set by `use_native_blocks` (it then replaces weight_q)
        self.register_buffer("codes_tiled", None, persistent=False)
        self.register_buffer("d_tiled", None, persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, **opts: Any) -> Int8Linear:
        q, s = quantize_per_channel(linear.weight)
        return cls(q, s, linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> Int8Linear:
        where = config.get("name", "?")
        q, s = require_tensors(tensors, ("weight_q", "scales"), where)
        check_shape(q, (out_features, in_features), "weight_q", where)
        check_shape(s, (out_features,), "scales", where)
        return cls(q.to(torch.int8), s, tensors.get("bias"))

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> Int8Linear | None:
        """Stack the layers' rows and row scales (per-row int8 merges exactly), when they share input
        width and device."""
        if not cls.alike(layers, lambda layer: (layer.in_features, layer.scales.device)):
            return None
        weight_q = torch.cat([layer.int8_weight() for layer in layers])  # [sum N, K]
        scales = torch.cat([layer.scales for layer in layers])  # [sum N]
        return cls(weight_q, scales, cls.concatenated_bias(layers))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight_q": self.int8_weight().cpu(), "scales": self.scales.cpu()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantize(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.native_blocks()
        if blocks is not None:
            return self._add_bias(blocks_forward(x, blocks, self.out_features))
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [..., K] -> [B*T, K]
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.kernel_scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # [B*T, N] -> [..., N]
        return self._add_bias(y)


class Int8Embedding(nn.Module):
    """Token embedding stored as per-row int8 (one scale per token); rows are dequantized on lookup.

    Built to share its tensors with a tied output head (`Int8Linear(q, s)` over the same q and s),
    so a tied model keeps one int8 copy.
    """

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_q.shape
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales.float())
        self.output_dtype = torch.float32  # the model's activation dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_q[ids].float() * self.scales[ids].unsqueeze(-1)  # [..., D]
        return rows.to(self.output_dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 table [num_embeddings, embedding_dim]."""
        return self.weight_q.float() * self.scales[:, None]
