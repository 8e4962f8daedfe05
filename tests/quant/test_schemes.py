"""Each scheme: round-trip error within its bound, quantized linear close to the float linear."""

from __future__ import annotations

import pytest
import torch

from lamina.quant.apply import quantize_linear
from lamina.quant.int4 import Int4Linear, pack_nibbles, unpack_nibbles
from lamina.quant.int8 import Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import (
    BLOCK_SIZE,
    FP4_CODE,
    NF4_CODE,
    NF4Linear,
    double_dequantize,
    double_quantize,
    dynamic_map,
)

from .conftest import random_linear


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_int8_round_trip_within_half_a_step() -> None:
    lin = random_linear()
    q = Int8Linear.from_float(lin)
    err = (q.dequantize() - lin.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()


def test_int4_minmax_round_trip_within_half_a_step_plus_bf16_zero() -> None:
    lin = random_linear()
    q = Int4Linear.from_float(lin, group_size=32, params="minmax")
    sz = q.scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    step = sz[..., 0].repeat_interleave(32, dim=1)
    zero = sz[..., 1].abs().repeat_interleave(32, dim=1)
    err = (q.dequantize() - lin.weight).abs()
    assert (err <= step / 2 + zero * 2**-8 + 1e-7).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_group_sizes_and_codes_survive_the_packed_kernel_layout(group_size: int) -> None:
    lin = random_linear(in_features=256, out_features=48)
    q = Int4Linear.from_float(lin, group_size=group_size)
    assert q.layout == "cpu"
    codes = q.codes()
    assert codes.max() <= 15
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert rel_err(q.dequantize(), lin.weight) < 0.12


def test_nf4_and_fp4_round_trip_nearest_code() -> None:
    lin = random_linear()
    for quant_type, code in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        q = NF4Linear.from_float(lin, quant_type=quant_type)
        blocks = lin.weight.reshape(-1, BLOCK_SIZE)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        gaps = torch.tensor(sorted(set(code))).diff().max()
        err = (q.dequantize().reshape(-1, BLOCK_SIZE) - blocks).abs()
        assert (err <= absmax * gaps / 2 + 1e-7).all(), quant_type


def test_double_quantized_absmax_takes_the_nearest_dynamic_map_code() -> None:
    absmax = torch.rand(1000) + 0.5
    q, scales, offset = double_quantize(absmax)
    assert q.dtype == torch.uint8 and scales.shape == (4,)
    centered = (absmax - offset).reshape(-1)
    per_value = scales.repeat_interleave(256)[:1000]
    assert torch.equal(scales, torch.nn.functional.pad(centered, (0, 24)).reshape(4, 256).abs().amax(dim=1))
    scaled = centered * (1.0 / per_value)
    nearest = (scaled[:, None] - dynamic_map()).abs().min(dim=1).values
    assert torch.equal((scaled - dynamic_map()[q.long()]).abs(), nearest)  # no code is closer
    assert torch.equal(double_dequantize(q, scales, offset), dynamic_map()[q.long()] * per_value + offset)


def test_double_quantized_checkpoints_saved_with_linear_int8_codes_still_load() -> None:
    """Saves from before the dynamic map hold int8 codes with a step of scale / 127."""
    q = torch.tensor([-127, 0, 64, 127], dtype=torch.int8)
    scales, offset = torch.tensor([0.5]), torch.tensor([1.0])
    assert torch.equal(double_dequantize(q, scales, offset), q.float() * 0.5 + 1.0)


@pytest.mark.parametrize(
    ("method", "tol"),
    [
        ("int8", 0.01),
        ("int4", 0.1),
        ("int4-minmax", 0.1),
        ("nf4", 0.12),
        ("nf4-dq", 0.12),
        ("fp4", 0.2),
        ("fp4-dq", 0.2),
        ("llm.int8", 0.02),
    ],
)
def test_quantized_linear_close_to_float(method: str, tol: float) -> None:
    """Relative L2 error of outputs on random inputs; tolerances ~ the scheme's weight error."""
    lin = random_linear(bias=True)
    q = quantize_linear(lin, method, name="layer", group_size=32)
    x = torch.randn(3, 5, 256)
    y = q(x)
    assert y.shape == (3, 5, 64) and y.dtype == x.dtype
    assert rel_err(y, lin(x)) < tol
    # The kernel output also matches the layer's own dequantized weight (only bf16 activation rounding apart).
    assert rel_err(y, torch.nn.functional.linear(x, q.dequantize(), lin.bias)) < 0.01


def test_llm_int8_outlier_columns_go_through_float() -> None:
    lin = random_linear()
    q = LLMInt8Linear.from_float(lin, threshold=6.0)
    x = torch.randn(4, 256)
    x[:, 7] = 50.0  # one outlier feature: quantizing it with the rest would swamp every other column
    ref = x @ q.dequantize().t()
    assert rel_err(q(x), ref) < 0.01
    no_outliers = LLMInt8Linear.from_float(lin, threshold=1e9)
    assert rel_err(no_outliers(x), ref) > 2 * rel_err(q(x), ref)


def test_weight_bytes_reflect_the_scheme() -> None:
    lin = random_linear(in_features=256, out_features=64)
    n = 256 * 64
    # int8 codes + float32 scales + the bf16 copy of the scales the kernel reads
    assert quantize_linear(lin, "int8").weight_bytes() == n + 64 * 4 + 64 * 2
    assert quantize_linear(lin, "int4", group_size=32).weight_bytes() == n // 2 + (256 // 32) * 64 * 2 * 2
    nf4 = quantize_linear(lin, "nf4").weight_bytes()
    assert n // 2 < nf4 < n // 2 + n // 64 * 4 + 100
