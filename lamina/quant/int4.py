"""Weight-only int4, group-wise asymmetric (group size 32 / 64 / 128 / 256 along in_features).

Representation (the layout the packed kernels take): codes q in [0, 15]; per group a scale s and a
zero z, both bfloat16, and w ~= (q - 8) * s + z. Each weight is rounded to its nearest code; the
group's s = (max - min) / 15 and, by default (`params="hqq"`), the zero point HQQ's optimization
finds for that scale (`lamina.quant.hqq`: 16.92 against 18.30 perplexity on SmolLM2 at group size 128),
or with `params="minmax"` z = min + 8 s. Min/max's round-trip error per element is at most s / 2
plus the bf16 rounding of z (<= 2^-8 |z|); HQQ's zero trades a few larger errors (up to a step, at a
group's ends) for smaller ones elsewhere.

Kernels: CPU `aten._convert_weight_to_int4pack_for_cpu` + `aten._weight_int4pack_mm_for_cpu`, CUDA
`aten._convert_weight_to_int4pack` + `aten._weight_int4pack_mm`. Both need bf16 activations with
bf16 scales for speed (CPU, torch 2.13, 1536x576, one token: ~22 us bf16, ~890 us float32, ~1050 us
float16), so `forward` casts x to bfloat16 around the kernel (x rounded to 8 mantissa bits).
Kernel constraints: out_features % 16 == 0 (CPU) / % 8 (CUDA); other shapes use a dequantize-then-
matmul fallback (correct, slow: it expands the weight on every call).

The packed weight is kernel- and ISA-specific, so the module remembers which device type it was
packed for and repacks after being moved. Export/unpack is layout-independent: running the kernel on
an identity matrix with s = 1, z = 8 returns the codes themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamina.kernels import native
from lamina.quant.base import (
    QuantizedLinear,
    check_shape,
    field_problem,
    is_positive_int,
    layer_group_size,
    require_tensors,
)
from lamina.quant.blocks import Blocks, blocks_forward, fits, tile_codes, tile_scales, untile_codes
from lamina.quant.hqq import hqq_group_params

GROUP_SIZES = (32, 64, 128, 256)
KERNEL_DTYPE = torch.bfloat16


def group_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) from min/max of wg [..., G]; float32 values exactly representable in bf16."""
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((mx - mn).clamp(min=1e-6) / 15).to(KERNEL_DTYPE)
    zeros = (mn + 8 * scales.float()).to(KERNEL_DTYPE)
    return scales.float(), zeros.float()


def hqq_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of wg [..., G] with HQQ's optimized zero point (`lamina.quant.hqq`), in
    this layout's w ~= (q - 8) s + z: s = HQQ's scale, z = (8 - HQQ's zero) s, each rounded to bf16."""
    scale, zero = hqq_group_params(wg)
    scales = scale.to(KERNEL_DTYPE)
    zeros = ((8 - zero) * scale).to(KERNEL_DTYPE)
    return scales.float(), zeros.float()


def quantize_with_params(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] for w given broadcastable scales/zeros (w ~= (q - 8) * s + z)."""
    return torch.round((w - zeros) / scales + 8).clamp(0, 15).to(torch.uint8)


#: `params=` of `quantize_rtn`: how each group's scale and zero are chosen before rounding.
GROUP_PARAMS = {"hqq": hqq_params, "minmax": group_params}


def quantize_rtn(
    weight: torch.Tensor, group_size: int, params: str = "hqq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 with each group's scale and zero from `GROUP_PARAMS[params]`: returns
    (codes uint8 [N, K], scales_and_zeros bf16 [K/G, N, 2])."""
    n, k = weight.shape
    wg = weight.detach().float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    s, z = GROUP_PARAMS[params](wg)  # [N, K/G] each
    q = quantize_with_params(wg, s[..., None], z[..., None]).reshape(n, k)  # [N, K]
    return q, make_scales_and_zeros(s, z)


def make_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, K/G] scales + zeros -> the kernels' bf16 [K/G, N, 2]."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Portable packing: codes [N, K] -> uint8 [N, K/2], low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)  # [N, K]


def dequantize_codes(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes [N, K] + bf16 [K/G, N, 2] -> float32 weight [N, K]."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    qg = q.float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    return ((qg - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k)


def kernel_for(device_type: str, n: int, k: int) -> str:
    """Which packed layout serves this device and shape: 'cpu', 'cuda', or 'plain' (fallback)."""
    if device_type == "cpu" and n % 16 == 0:
        return "cpu"
    if device_type == "cuda" and n % 8 == 0 and k % 32 == 0:
        return "cuda"
    return "plain"


def _inner_k_tiles(k: int) -> int:
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2


def pack_for(layout: str, q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] -> the weight tensor `layout` expects."""
    if layout == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    if layout == "cuda":
        hi_first = (q[:, 0::2] << 4) | q[:, 1::2]  # CUDA kernel input: uint8 [N, K/2], high nibble = even
        return torch.ops.aten._convert_weight_to_int4pack(hi_first.contiguous(), _inner_k_tiles(q.shape[1]))
    return pack_nibbles(q)


def _mm(
    layout: str, x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor
) -> torch.Tensor:
    if layout == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


def unpack_from(layout: str, packed: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """Recover codes uint8 [N, K] from any layout by multiplying the identity (s = 1, z = 8)."""
    if layout == "plain":
        return unpack_nibbles(packed)
    if layout == "blocks":
        return untile_codes(packed.cpu(), 4)
    # The packed bytes may have been moved off the device whose kernel packed them.
    packed = packed.cpu() if layout == "cpu" else packed.cuda()
    sz = torch.zeros(k // group_size, n, 2, dtype=KERNEL_DTYPE, device=packed.device)
    sz[..., 0], sz[..., 1] = 1, 8
    rows = []
    for start in range(0, k, 1024):  # bounded temporaries for wide layers
        eye = torch.eye(k, dtype=KERNEL_DTYPE, device=packed.device)[start : start + 1024]  # [<=1024, K]
        rows.append(_mm(layout, eye, packed, group_size, sz))  # [<=1024, N] = q^T rows
    return torch.cat(rows).t().round().to(torch.uint8).contiguous()  # [N, K]


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric int4 linear on the packed int4 kernels."""

    method = "int4"

    def __init__(
        self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.layout = kernel_for(codes.device.type, out_features, in_features)
        self.register_buffer("weight_packed", pack_for(self.layout, codes))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(KERNEL_DTYPE).contiguous())
        # the native block layout's scales, set by `use_native_blocks` (derived: not saved)
        self.register_buffer("d_tiled", None, persistent=False)
        self.register_buffer("m_tiled", None, persistent=False)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, group_size: int = 128, name: str = "?", params: str = "hqq", **opts: Any
    ) -> Int4Linear:
        """`params`: "hqq" (HQQ's zero point) or "minmax", see the module docstring."""
        group_size = layer_group_size(linear.in_features, group_size, GROUP_SIZES, name)
        q, sz = quantize_rtn(linear.weight, group_size, params)
        return cls(q, sz, group_size, linear.bias)

    @classmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> Int4Linear:
        where, g = config.get("name", "?"), int(config["group_size"])
        packed, sz = require_tensors(tensors, ("qweight", "scales_and_zeros"), where)
        check_shape(packed, (out_features, in_features // 2), "qweight", where)
        check_shape(sz, (in_features // g, out_features, 2), "scales_and_zeros", where)
        return cls(unpack_nibbles(packed.to(torch.uint8)), sz, g, tensors.get("bias"))

    @classmethod
    def config_problem(cls, config: dict[str, Any]) -> str | None:
        problem = (
            super().config_problem(config)
            or field_problem(config, "group_size", is_positive_int, "not a positive integer")
            or field_problem(
                config, "group_size", GROUP_SIZES.__contains__, f"not one of {list(GROUP_SIZES)}"
            )
        )
        if problem is None and config["in_features"] % config["group_size"]:
            group_size, in_features = config["group_size"], config["in_features"]
            return f"has group_size {group_size}, which does not divide its in_features {in_features}"
        return problem

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> Int4Linear | None:
        """Stack the layers' codes and per-group scales along the outputs, when they share input width,
        group size and device; the merged layer is packed once (the packed layouts interleave rows, so
        they are not concatenated as they are)."""
        if not cls.alike(
            layers, lambda layer: (layer.in_features, layer.group_size, layer.weight_packed.device)
        ):
            return None
        first = layers[0]
        codes = torch.cat([layer.codes() for layer in layers]).to(first.weight_packed.device)  # [sum N, K]
        scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)  # [K/G, sum N, 2]
        return cls(codes, scales_and_zeros, first.group_size, cls.concatenated_bias(layers))

    def scheme_config(self) -> dict[str, Any]:
        return {"method": self.method, "group_size": self.group_size}

    def codes(self) -> torch.Tensor:
        """Codes uint8 [N, K] in [0, 15], whatever the runtime layout."""
        return unpack_from(
            self.layout, self.weight_packed, self.out_features, self.in_features, self.group_size
        ).cpu()

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_nibbles(self.codes()), "scales_and_zeros": self.scales_and_zeros.cpu()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes(), self.scales_and_zeros.cpu(), self.group_size)

    def _ensure_layout(self, device_type: str) -> None:
        """Repack after the module moved to another device type (the packed layouts differ)."""
        if self.layout == "blocks" and device_type == "cpu":
            return
        wanted = kernel_for(device_type, self.out_features, self.in_features)
        if wanted != self.layout:
            codes = self.codes().to(self.weight_packed.device)
            self.weight_packed = pack_for(wanted, codes)
            self.layout = wanted
            self.d_tiled = self.m_tiled = None

    def use_native_blocks(self) -> bool:
        """Repack for Lamina's native block kernel (`lamina/kernels/blockq.c`) when it runs here: each
        32-column block gets its group's d = s and m = z with code offset 8, in fp16 (exact: s and z
        are bf16, and fp16 holds bf16 values in its normal range; a |z| below it is off by < 3e-8).
        Returns whether the layer now uses it; layers whose scales fp16 cannot hold keep the torch
        kernel."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.layout != "cpu" or not fits(n, k) or native.library() is None:
            return False
        scales, zeros = self.scales_and_zeros.float().permute(2, 1, 0)  # [K/G, N, 2] -> 2 x [N, K/G]
        d = scales.repeat_interleave(g // 32, dim=1)  # [N, K/32]
        m = zeros.repeat_interleave(g // 32, dim=1)
        fp16 = torch.finfo(torch.float16)
        if d.min() < fp16.smallest_normal or max(d.abs().max(), m.abs().max()) > fp16.max:
            return False
        self.weight_packed = tile_codes(self.codes(), 4)
        self.d_tiled, self.m_tiled = tile_scales(d), tile_scales(m)
        self.layout = "blocks"
        return True

    def native_blocks(self) -> Blocks | None:
        """(codes, d, m tiles, bits, code offset, no code book) for the native kernels, or None off the
        block layout."""
        return (
            (self.weight_packed, self.d_tiled, self.m_tiled, 4, 8, None) if self.layout == "blocks" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_layout(self.weight_packed.device.type)
        if self.layout == "blocks":
            return self._add_bias(blocks_forward(x, self.native_blocks(), self.out_features))
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [..., K] -> [B*T, K]
        if self.layout == "plain":
            w = dequantize_codes(unpack_nibbles(self.weight_packed), self.scales_and_zeros, self.group_size)
            y = x2 @ w.to(KERNEL_DTYPE).t()
        else:
            y = _mm(self.layout, x2, self.weight_packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # [B*T, N] -> [..., N]
        return self._add_bias(y)
