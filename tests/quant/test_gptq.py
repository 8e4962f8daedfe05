"""GPTQ: beats round-to-nearest on the calibration objective, stays in the int4 layout."""

from __future__ import annotations

import pytest
import torch

from lamina.quant.gptq import gptq_linear
from lamina.quant.int4 import Int4Linear

from .conftest import random_linear


def correlated_inputs(n: int = 512, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Activations with strongly unequal, correlated features (what makes GPTQ pay off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.linspace(0.1, 3.0, k)
    return torch.randn(n, k, generator=g) @ mix


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_output_error_below_rtn(group_size: int, act_order: bool) -> None:
    lin = random_linear(in_features=256, out_features=64)
    x = correlated_inputs()
    h = 2 * x.t() @ x / x.shape[0]
    gptq = gptq_linear(lin, h, group_size=group_size, act_order=act_order, name="layer")
    rtn = Int4Linear.from_float(lin, group_size=group_size)
    ref = lin(x)

    def err(layer: Int4Linear) -> float:
        return float((x @ layer.dequantize().t() - ref).pow(2).mean())

    assert isinstance(gptq, Int4Linear) and gptq.group_size == group_size
    assert err(gptq) < 0.8 * err(rtn)
    # The packed kernel agrees with the layer's dequantized weight.
    y = gptq(x[:4])
    assert torch.allclose(y, x[:4] @ gptq.dequantize().t(), rtol=0.02, atol=0.02 * float(y.abs().max()))
