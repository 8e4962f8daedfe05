"""Quantized q/k/v and gate/up projections merge into one layer that computes exactly what they did."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.engine.fusion import fuse_projections
from lamina.kernels import native
from lamina.models.layers import _fuse_linears
from lamina.quant.apply import quantize_model
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.int4 import Int4Linear
from lamina.quant.int8 import Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear

from .conftest import random_linear


def _layers(scheme, **opts):
    shapes = [(256, 64, False), (256, 32, True), (256, 32, False)]  # q, k (with a bias), v
    return [
        scheme.from_float(random_linear(k, n, bias, seed=i), **opts) for i, (k, n, bias) in enumerate(shapes)
    ]


@pytest.mark.parametrize(
    ("scheme", "opts"), [(Int4Linear, {"group_size": 64}), (Int8Linear, {}), (LLMInt8Linear, {})]
)
def test_concatenated_layer_outputs_equal_the_separate_outputs(scheme, opts):
    layers = _layers(scheme, **opts)
    fused = _fuse_linears(*layers)
    assert type(fused) is scheme and fused.out_features == 128
    x = torch.randn(3, 5, 256)
    x[1, 2, 7] = 20.0  # an outlier feature (LLM.int8 routes its column through float)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)  # [3, 5, 128]
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(fused.dequantize(), torch.cat([layer.dequantize() for layer in layers]))


def test_layers_that_cannot_merge_stay_separate():
    int4 = _layers(Int4Linear, group_size=64)
    assert _fuse_linears(int4[0], *_layers(Int8Linear)[1:]) is None  # mixed schemes
    other_groups = Int4Linear.from_float(random_linear(256, 32), group_size=32)
    assert _fuse_linears(int4[0], int4[1], other_groups) is None  # mixed group sizes
    llm_int8 = _layers(LLMInt8Linear)
    llm_int8[2].threshold = 4.0
    assert _fuse_linears(*llm_int8) is None  # outlier thresholds differ


@pytest.mark.parametrize("method", ["int4", "int8", "llm.int8"])
def test_quantized_model_fuses_and_keeps_its_logits(tiny_model, method):
    quantize_model(tiny_model, method, group_size=32)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model(ids)
        assert fuse_projections(tiny_model) == 2 * len(tiny_model.model.layers)  # attention + MLP per layer
        torch.testing.assert_close(tiny_model(ids), expected)


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "torch-kernels"])
def test_default_gguf_fuses_its_kept_layers_without_changing_tokens(
    default_gguf, native_kernels, monkeypatch
):
    """Kept GGUF blocks fuse on both paths: the native block kernel, and int4 where it is unavailable."""
    if not native_kernels:  # as if turned off (LAMINA_NATIVE_KERNELS=0), which is not warned about
        monkeypatch.setattr(native, "library", lambda: None)
        monkeypatch.setenv(native.DISABLE_ENV, "0")
    elif native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    prompt = "The history of the Roman empire is"
    fused = LLM.load(default_gguf, device="cpu")
    unfused = LLM.load(default_gguf, device="cpu", fuse=False)
    kept_as = BlockQuantLinear if native_kernels else Int4Linear
    assert type(fused.model.model.layers[0].self_attn.qkv_proj) is kept_as
    assert type(fused.model.model.layers[0].mlp.gate_up_proj) is kept_as
    assert fused.memory_footprint() == unfused.memory_footprint()
    expected = unfused.generate(prompt, max_new_tokens=40, temperature=0)
    assert fused.generate(prompt, max_new_tokens=40, temperature=0) == expected
