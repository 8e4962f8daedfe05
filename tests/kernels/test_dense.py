"""Float32 linears on the native kernel (`NativeLinear`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lamina.kernels import native
from lamina.models.native_linear import NATIVE_ROWS, NativeLinear, attach_native_linears
from lamina.quant.apply import quantizable_linears


def native_linear(in_features: int, out_features: int, bias: bool) -> NativeLinear:
    torch.manual_seed(in_features + out_features)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    assert attach_native_linears(model) == 1
    return model[0]


@pytest.mark.parametrize("shape", [(576, 1536), (100, 577), (33, 64), (7, 5)])
@pytest.mark.parametrize("rows", [1, 5, NATIVE_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(native_lib, shape, rows: int, bias: bool) -> None:
    layer = native_linear(*shape, bias)
    x = torch.randn(1, rows, shape[0])
    y = layer(x)
    expected = F.linear(
        x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double()
    )
    assert y.shape == (1, rows, shape[1])
    assert (y.double() - expected).abs().max() <= 1e-6 * expected.abs().max() * shape[0] ** 0.5


def test_rows_are_bit_identical_alone_or_together(native_lib) -> None:
    layer = native_linear(576, 960, False)
    x = torch.randn(7, 576)
    assert torch.equal(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(7)]))


def test_prompts_and_other_dtypes_take_torch(native_lib) -> None:
    layer = native_linear(64, 48, True)
    long = torch.randn(NATIVE_ROWS + 1, 64)
    assert torch.equal(layer(long), F.linear(long, layer.weight, layer.bias))
    half = torch.randn(2, 64, dtype=torch.bfloat16)
    layer_bf16 = native_linear(64, 48, True).to(torch.bfloat16)
    assert torch.equal(layer_bf16(half), F.linear(half, layer_bf16.weight, layer_bf16.bias))


def test_attached_linears_stay_linears_for_quantization(native_lib) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    weight = model[0].weight
    attach_native_linears(model)
    assert model[0].weight is weight  # same parameters: nothing copied
    assert set(quantizable_linears(model, skip=())) == {"0", "1"}


def test_nothing_is_attached_without_the_kernels(monkeypatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    model = nn.Sequential(nn.Linear(8, 8))
    assert attach_native_linears(model) == 0
    assert type(model[0]) is nn.Linear
