"""The AVX2 build of the native kernels gives the AVX-512 build's results bit for bit.

Laptops without AVX-512 run the AVX2 build (simd.h composes VPDPBUSD, masks and mask moves from
AVX2 instructions); everything else in the suite runs the best build the CPU has. These tests run
both builds on the same inputs, so they need a CPU with AVX-512 VNNI (the development and CI
machines); `LAMINA_NATIVE_KERNELS=avx2 make test` runs the whole suite on the AVX2 build alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lamina.kernels import native
from lamina.quant.hqq import hqq_group_params
from tests.kernels.test_attention import CASES
from tests.kernels.test_blockq import RUNTIME_TYPES, random_layer
from tests.models.test_native_layer import blocks_model, decode


@pytest.fixture(autouse=True)
def _both_builds() -> None:
    if native.supported_isas() != list(native.ISAS):
        pytest.skip(
            f"needs a CPU that runs every build ({', '.join(native.ISAS)}), this one runs {native.supported_isas()}"
        )
    for isa in native.ISAS:
        assert native.load(isa) is not None, f"the {isa} build failed: {native.unavailable_reason()}"


def on_each_build(monkeypatch: pytest.MonkeyPatch, compute: Callable[[], object]) -> list[object]:
    """`compute()` once with each build of the library in place of the selected one."""
    results = []
    for isa in native.ISAS:
        monkeypatch.setattr(native, "library", lambda isa=isa: native.load(isa))
        results.append(compute())
    return results


def heavy_tailed(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g) * torch.randn(rows, k, generator=g).exp() * 3


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_block_products_are_identical(monkeypatch, ggml_type: str, rows: int) -> None:
    layer = random_layer(ggml_type, 48, 256, seed=rows)
    x = heavy_tailed(rows, 256, seed=rows)
    avx512, avx2 = on_each_build(monkeypatch, lambda: layer(x))
    assert torch.equal(avx512, avx2)


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
def test_largest_codes_times_largest_activations_do_not_overflow(monkeypatch, ggml_type: str) -> None:
    """AVX2's VPMADDUBSW keeps int16 sums: byte 255 x 127 twice overflows one, and so do too many
    5- or 6-bit products added up; simd.h splits the bytes and bounds the runs."""
    layer = random_layer(ggml_type, 16, 64)
    layer.codes_tiled.fill_(0xFF)  # every code the largest (IQ4_NL: code 15, table byte 241)
    x = torch.ones(2, 64)  # every int8 activation code 127
    x[1] = -1  # and -127
    avx512, avx2 = on_each_build(monkeypatch, lambda: layer(x))
    assert torch.equal(avx512, avx2)
    expected = x.double() @ layer.dequantize().double().t()
    assert (avx2.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize(
    ("k", "dtype"), [(64, torch.float32), (100, torch.float32), (64, torch.float16), (96, torch.bfloat16)]
)  # 100: a 4-float tail read under a mask
def test_dense_products_are_identical(monkeypatch, k: int, dtype: torch.dtype) -> None:
    weight, bias = torch.randn(37, k).to(dtype), torch.randn(37)
    x = heavy_tailed(3, k, seed=k)
    avx512, avx2 = on_each_build(monkeypatch, lambda: native.dense_linear(x, weight, bias))
    assert torch.equal(avx512, avx2)


@pytest.mark.parametrize("block", [(1, 96), (32, 32)])
def test_e4m3_products_are_identical(monkeypatch, block: tuple[int, int]) -> None:
    weight = (torch.randn(37, 96) * 50).to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.rand(-(-37 // block[0]), 96 // block[1]) + 0.5
    x, bias = heavy_tailed(3, 96, seed=7), torch.randn(37)
    avx512, avx2 = on_each_build(monkeypatch, lambda: native.e4m3_linear(x, weight, scales, block, bias))
    assert torch.equal(avx512, avx2)


@pytest.mark.parametrize("case", CASES)
def test_attention_is_identical(monkeypatch, case) -> None:
    batch, rows, heads, kv_heads, dim, start, window, length = case
    g = torch.Generator().manual_seed(dim)
    q = torch.randn(batch, rows, heads, dim, generator=g)
    keys = torch.randn(batch, kv_heads, length, dim, generator=g) * 2
    values = torch.randn(batch, kv_heads, length, dim, generator=g)
    avx512, avx2 = on_each_build(
        monkeypatch, lambda: native.decode_attention(q, keys, values, start, window, dim**-0.5)
    )
    assert torch.equal(avx512, avx2)


def test_native_decoder_layers_are_identical(monkeypatch) -> None:
    model = blocks_model(sliding_window=6)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))

    def logits() -> list[torch.Tensor]:
        with torch.inference_mode():
            return decode(model, prompt, [[5], [17, 200, 3], [42]], native_layers=True)[0]

    avx512, avx2 = on_each_build(monkeypatch, logits)
    for a, b in zip(avx512, avx2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("std", [0.02, 0.5])  # 0.5: errors past the shrink's threshold (its scalar lanes)
def test_hqq_zero_points_are_identical(monkeypatch, std: float) -> None:
    wg = heavy_tailed(96, 256, seed=5).reshape(96, 4, 64) * std
    avx512, avx2 = on_each_build(monkeypatch, lambda: hqq_group_params(wg)[1])
    assert torch.equal(avx512, avx2)
