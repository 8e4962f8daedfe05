"""FP8 weights kept at 8 bits (`lamina/quant/fp8.py`, `kernels/dense.c`): the kernel's exact widening of
every e4m3 value, block scales, the layer's rounding, fusing, and the native decoder layer."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM
from lamina.errors import CheckpointError
from lamina.kernels import native
from lamina.quant.fp8 import E4M3, E4M3_MAX, Fp8Linear
from tests.models.test_native_layer import decode
from tests.quant.conftest import random_linear
from tests.quant.test_fp8_format import write_transformers_fp8


def random_fp8(n: int, k: int, block: tuple[int, int], seed: int = 0) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 100).to(E4M3)
    scales = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) * 1e-3 + 1e-4
    return Fp8Linear(weight, scales, block, bias=torch.randn(n, generator=g))


def test_the_kernel_widens_every_e4m3_value_exactly(native_lib) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    codes[~torch.isfinite(codes.view(E4M3).float())] = 0  # the two NaN codes
    weight = codes.reshape(16, 16)  # [N, K]: row n holds codes 16n..16n+15
    y = native.e4m3_linear(torch.eye(16), weight, torch.ones(1, 1), (16, 16), None)  # y[i, n] = w[n, i]
    assert torch.equal(y.t(), weight.view(E4M3).float())


@pytest.mark.parametrize("block", [(1, 576), (128, 128), (200, 576), (128, 64), (64, 16)])
def test_block_scales_multiply_their_blocks(native_lib, block: tuple[int, int]) -> None:
    layer = random_fp8(200, 576, block)  # 200 rows: blocks of 128 rows end short
    x = torch.randn(3, 576)
    expected = x.double() @ layer.dequantize().double().t() + layer.bias.double()
    got = layer(x)
    assert (got.double() - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert torch.equal(layer(x[1:2]), got[1:2])  # each row computed alone


def test_long_inputs_and_kernel_less_cpus_widen_the_weight(native_lib, monkeypatch) -> None:
    layer = random_fp8(48, 64, (16, 32))
    x = torch.randn(40, 64)  # more rows than a decode step: widened for the call
    expected = x.double() @ layer.dequantize().double().t() + layer.bias.double()
    assert (layer(x).double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    monkeypatch.setattr(native, "library", lambda: None)
    assert layer.native_e4m3() is None
    assert (layer(x[:2]).double() - expected[:2]).abs().max() <= 1e-5 * expected.abs().max()


def test_from_float_rounds_each_weight_to_the_nearest_e4m3_value() -> None:
    linear = random_linear(256, 64)
    layer = Fp8Linear.from_float(linear)
    w = linear.weight.float()
    scales = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [N, 1]
    assert torch.equal(layer.scales, scales)
    assert layer.weight8.float().abs().amax() == E4M3_MAX  # each row's largest weight maps to 448
    # 3 mantissa bits: within 2^-4 of each weight, or of the smallest normal's step below 2^-6
    error = (layer.dequantize() - w).abs()
    assert (error <= torch.maximum(w.abs() * 2**-4, scales * 2**-10)).all()
    assert layer.weight_bytes() == 64 * 256 + 64 * 4  # a byte a weight, a float32 scale a row


@pytest.mark.parametrize(("rows", "expected_rows"), [(128, 128), (96, 1)])
def test_concatenated_layers_compute_the_parts(native_lib, rows: int, expected_rows: int) -> None:
    """Parts ending on a block boundary keep their blocks; others get a scale per row."""
    parts = [random_fp8(rows, 256, (128, 128), seed=i) for i in range(3)]
    fused = Fp8Linear.concatenate(parts)
    assert fused.scale_block == (expected_rows, 128)
    x = torch.randn(2, 256)
    assert torch.equal(fused(x), torch.cat([part(x) for part in parts], dim=-1))


def test_fp8_checkpoint_decodes_on_the_native_layer_as_the_modules_do(
    native_lib, tiny_models, tmp_path
) -> None:
    write_transformers_fp8(tiny_models["llama"][1], tmp_path / "m", (32, 32))
    model = LLM.load(tmp_path / "m").model
    assert all(layer.native is not None and layer.native._refresh() for layer in model.decoder_layers())
    assert isinstance(model.get_submodule("model.layers.0.self_attn.qkv_proj"), Fp8Linear)  # fused
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = [[5], [17, 200, 3], [42]]
    with torch.inference_mode():
        got, _ = decode(model, prompt, steps, native_layers=True)
        want, _ = decode(model, prompt, steps, native_layers=False)
    for a, b in zip(got, want, strict=True):  # measured 1.4e-7: float32 in both, rounded differently
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_saved_weights_of_another_dtype_are_named() -> None:
    layer = random_fp8(16, 32, (1, 32))
    tensors = {**layer.export_tensors(), "weight": layer.dequantize()}  # float32, not e4m3
    with pytest.raises(CheckpointError, match=r"tensor weight is torch\.float32, not torch\.float8_e4m3fn"):
        Fp8Linear.from_tensors(32, 16, {"name": "l", **layer.scheme_config()}, tensors)
