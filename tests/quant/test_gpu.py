"""CUDA paths of the quantized layers: packed int4/int8 kernels, repacking after a move, NF4 via bitsandbytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lamina.quant.apply import quantize_linear

from .conftest import random_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "fp4-dq", "llm.int8", "fp8"])
def test_cuda_forward_matches_dequantized_weight(method: str) -> None:
    lin = random_linear(in_features=256, out_features=128).cuda()
    q = quantize_linear(lin, method, group_size=64)
    x = torch.randn(20, 256, device="cuda")
    assert rel_err(q(x), x @ q.dequantize().cuda().t()) < 0.02


def test_int4_repacks_when_moved_between_cpu_and_cuda() -> None:
    lin = random_linear(in_features=256, out_features=128)
    q = quantize_linear(lin, "int4", group_size=64)
    codes = q.codes()
    x = torch.randn(3, 256)
    y_cpu = q(x)
    q.cuda()
    y_cuda = q(x.cuda())
    assert q.layout == "cuda" and torch.equal(q.codes(), codes)
    assert rel_err(y_cuda.cpu(), y_cpu) < 0.01
    q.cpu()
    assert torch.equal(q(x), y_cpu)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_uses_bitsandbytes_with_identical_codes() -> None:
    import bitsandbytes.functional as bnbf

    lin = random_linear(in_features=256, out_features=128).cuda()
    q = quantize_linear(lin, "nf4")
    x = torch.randn(4, 256, device="cuda")
    y = q(x)
    assert q._bnb is not None
    qweight, state = q._bnb
    assert torch.equal(bnbf.dequantize_4bit(qweight, state).float(), q.dequantize().cuda().half().float())
    assert rel_err(y, x @ q.dequantize().cuda().t()) < 0.01


@pytest.mark.parametrize("method", ["int8", "llm.int8", "nf4"])
def test_layers_repacked_for_the_cpu_kernel_still_run_after_moving_to_cuda(method: str) -> None:
    lin = random_linear(in_features=256, out_features=128)
    q = quantize_linear(lin, method)
    x = torch.randn(3, 256)
    before = q.export_tensors()
    q.use_native_blocks()  # a no-op where the native kernels cannot run
    y_cpu = q(x)
    q.cuda()
    assert rel_err(q(x.cuda()).cpu(), y_cpu) < 0.01
    after = q.export_tensors()
    assert all(torch.equal(before[name], after[name]) for name in before)
    q.cpu()
    assert rel_err(q(x), y_cpu) < 0.01


@pytest.mark.parametrize(("method", "sym", "act_order"), [("gptq", True, True), ("awq", False, False)])
def test_hub_checkpoints_load_on_cuda(tiny_models, tmp_path, method, sym, act_order) -> None:
    """GPTQ / AWQ layers on CUDA become `Int4Linear`s on its kernel (bf16 scale and zero), act-order
    ones wrapped to gather their inputs; logits as transformers' on the dequantized weights."""
    from lamina import LLM
    from lamina.quant.int4 import Int4Linear

    from .test_hub_formats import IDS_FOR_LOGITS, reference_logits, write_hub_checkpoint

    hf_model, src = tiny_models["llama"]
    state = write_hub_checkpoint(src, tmp_path / "q", method, sym=sym, act_order=act_order)
    expected = reference_logits(hf_model, state, IDS_FOR_LOGITS)
    llm = LLM.load(tmp_path / "q", device="cuda", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS_FOR_LOGITS.cuda())[0].float().cpu()
    layers = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 14 and all(m.layout == "cuda" for m in layers)
    assert torch.allclose(got, expected, rtol=0, atol=0.02 * expected.abs().max())


def test_8_bit_gptq_checkpoint_loads_on_cuda(tiny_models, tmp_path) -> None:
    """8-bit GPTQ layers with groups on CUDA: 16-bit weights (no int8 layout here holds groups);
    logits as transformers' on the dequantized weights."""
    from lamina import LLM
    from lamina.quant.half import HalfLinear

    from .test_hub_formats import IDS_FOR_LOGITS, reference_logits, write_hub_checkpoint

    hf_model, src = tiny_models["llama"]
    state = write_hub_checkpoint(src, tmp_path / "q", "gptq", sym=True, act_order=False, bits=8)
    expected = reference_logits(hf_model, state, IDS_FOR_LOGITS)
    llm = LLM.load(tmp_path / "q", device="cuda", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS_FOR_LOGITS.cuda())[0].float().cpu()
    assert len([m for m in llm.model.modules() if isinstance(m, HalfLinear)]) == 14
    assert torch.allclose(got, expected, rtol=0, atol=0.02 * expected.abs().max())


def test_fp8_checkpoint_loads_on_cuda_as_16_bit_weights(tiny_models, tmp_path) -> None:
    """FP8 layers on CUDA: 16-bit weights (the e4m3 mat-vec is the CPU kernel's); logits as the
    float model's on the stored values."""
    from lamina import LLM
    from lamina.quant.half import HalfLinear

    from .test_fp8_format import IDS, reference_logits, write_transformers_fp8

    hf_model, src = tiny_models["llama"]
    reference = write_transformers_fp8(src, tmp_path / "m", (32, 32))
    expected = reference_logits(hf_model, reference)
    llm = LLM.load(tmp_path / "m", device="cuda", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS.cuda())[0].float().cpu()
    assert len([m for m in llm.model.modules() if isinstance(m, HalfLinear)]) == 14
    assert torch.allclose(got, expected, rtol=0, atol=0.02 * expected.abs().max())
