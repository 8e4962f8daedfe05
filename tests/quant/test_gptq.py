"""GPTQ: beats round-to-nearest on the calibration objective, stays in the int4 layout."""

from __future__ import annotations

import pytest
import torch

from lamina.quant.gptq import gptq_linear, weighted_group_params
from lamina.quant.int4 import Int4Linear, group_params, quantize_with_params

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


def weighted_error(
    wg: torch.Tensor, importance: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """sum(importance * (w - deq)^2) per group [N, groups] for wg [N, groups, G] and (s, z) [N, groups]."""
    deq = (quantize_with_params(wg, s[..., None], z[..., None]).float() - 8) * s[..., None] + z[..., None]
    return (importance * (wg - deq).square()).sum(dim=-1)


def test_group_params_clip_outliers_in_unimportant_columns() -> None:
    g = torch.Generator().manual_seed(1)
    wg = torch.rand(8, 1, 32, generator=g) * 2 - 1  # [N, groups, G]
    wg[:, 0, :2] = torch.tensor([3.0, -3.0])  # large weights on two inputs that are rarely large
    importance = torch.ones(32)
    importance[:2] = 1e-4

    s, z = weighted_group_params(wg, importance)
    s_minmax, z_minmax = group_params(wg)
    assert torch.all(s < s_minmax)  # the range was clipped
    assert torch.all(
        weighted_error(wg, importance, s, z) < 0.5 * weighted_error(wg, importance, s_minmax, z_minmax)
    )


def test_group_params_never_worse_than_min_max() -> None:
    wg = torch.randn(8, 4, 32, generator=torch.Generator().manual_seed(2))  # [N, groups, G]
    importance = torch.rand(32, generator=torch.Generator().manual_seed(3))
    searched = weighted_error(wg, importance, *weighted_group_params(wg, importance))
    assert torch.all(searched <= weighted_error(wg, importance, *group_params(wg)))
