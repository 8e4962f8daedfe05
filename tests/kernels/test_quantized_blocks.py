"""int4, int8, LLM.int8, NF4 and FP4 layers (`--quantize int4 / int8 / llm.int8 / nf4 / fp4`, GPTQ)
repacked for the native block kernel."""

from __future__ import annotations

import pytest
import torch

from lamina.engine.fusion import attach_native, fuse_projections
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.apply import quantize_model
from lamina.quant.int4 import Int4Linear, quantize_rtn
from lamina.quant.int8 import Int8Embedding, Int8Linear, quantize_per_channel
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import CODE_BOOKS, NF4Linear, kernel_table
from tests.quant.conftest import tiny_config


def int4_layer(n: int = 64, k: int = 256, group_size: int = 128, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    weight = torch.randn(n, k) * 0.05 + 0.01
    codes, scales_and_zeros = quantize_rtn(weight, group_size)
    return Int4Linear(codes, scales_and_zeros, group_size, None)


def test_repacked_layer_computes_its_dequantized_weight(native_lib) -> None:
    layer = int4_layer()
    before = layer.export_tensors()
    weight = layer.dequantize()
    assert layer.use_native_blocks() and layer.layout == "blocks"
    x = torch.randn(3, 256)
    # the weight exactly (fp16 holds the bf16 scales and zeros); x to two int8 passes
    assert (layer(x) - x @ weight.t()).abs().max() <= 1e-4 * (x @ weight.t()).abs().max()
    after = layer.export_tensors()  # the portable form does not depend on the runtime layout
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(layer.dequantize(), weight)


def test_repacked_rows_are_bit_identical_alone_or_together(native_lib) -> None:
    layer = int4_layer(group_size=64)
    layer.use_native_blocks()
    x = torch.randn(5, 256)
    assert torch.equal(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(5)]))


def test_scales_fp16_cannot_hold_keep_the_torch_kernel(native_lib) -> None:
    tiny = int4_layer()
    tiny.scales_and_zeros[..., 0] = 1e-6  # below fp16's normal range
    assert not tiny.use_native_blocks() and tiny.layout == "cpu"
    odd = Int4Linear(torch.zeros(24, 64, dtype=torch.uint8), torch.ones(2, 24, 2), 32, None)  # 24 rows
    assert not odd.use_native_blocks()


def int8_layer(n: int = 64, k: int = 256, seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    q, scales = quantize_per_channel(torch.randn(n, k) * 0.05)
    return Int8Linear(q, scales, None)


def test_repacked_int8_layer_computes_its_weight_with_fp16_row_scales(native_lib) -> None:
    layer = int8_layer()
    before = layer.export_tensors()
    assert layer.use_native_blocks() and layer.weight_q is None
    x = torch.randn(3, 256)
    rounded = before["weight_q"].float() * before["scales"].half().float()[:, None]  # fp16 row scales
    assert (layer(x) - x @ rounded.t()).abs().max() <= 1e-4 * (x @ rounded.t()).abs().max()
    after = layer.export_tensors()
    assert all(torch.equal(before[name], after[name]) for name in before)
    x1 = torch.randn(4, 256)
    assert torch.equal(layer(x1), torch.cat([layer(x1[i : i + 1]) for i in range(4)]))


def test_an_int8_head_sharing_its_codes_with_the_embedding_stays(native_lib) -> None:
    head = int8_layer(48, 64)
    model = torch.nn.ModuleDict({"embed": Int8Embedding(head.weight_q, head.scales), "head": head})
    attach_native(model)
    assert head.weight_q is not None and head.native_blocks() is None


def test_quantized_models_decode_on_native_layers(native_lib) -> None:
    for method in ("int4", "int8", "nf4", "fp4-dq"):
        torch.manual_seed(0)
        tiny_model = LlamaForCausalLM(tiny_config(head_dim=16)).eval().requires_grad_(False)
        quantize_model(tiny_model, method, group_size=32)
        fuse_projections(tiny_model)
        _, layers = attach_native(tiny_model)
        assert layers == 2, method
        assert all(m.native_blocks() is not None for m in tiny_model.modules() if hasattr(m, "native_blocks"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_book_tables_hold_the_values_to_2_to_the_minus_8(quant_type: str) -> None:
    table = kernel_table(quant_type).double()
    held = (table[:16] - 128) + (table[16:] - 64) / 128  # 127 v, as the kernel computes it
    code = torch.tensor(CODE_BOOKS[quant_type], dtype=torch.float64)
    assert (held - 127 * code).abs().max() <= 2**-8
    assert table[16:].max() <= 128  # b fits an unsigned byte after its offset of 64


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", False)])
def test_repacked_4bit_code_book_layer_computes_its_weight(
    native_lib, quant_type: str, double_quant: bool
) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 64, bias=True)
    layer = NF4Linear.from_float(linear, quant_type=quant_type, double_quant=double_quant)
    before, weight = layer.export_tensors(), layer.dequantize()
    assert layer.use_native_blocks() and layer.weight_packed is None
    x = torch.randn(5, 192)
    ref = x @ weight.t() + linear.bias
    # fp16 block scales (2^-12 relative) and the code book to 3.1e-5 of absmax; x to two int8 passes
    assert (layer(x) - ref).abs().max() <= 5e-4 * ref.abs().max()
    after = layer.export_tensors()  # the stored codes and absmax are unchanged by the repacking
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(layer.dequantize(), weight)
    assert torch.equal(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(5)]))


def test_code_book_layers_whose_rows_split_a_block_keep_the_dequantizing_path(native_lib) -> None:
    layer = NF4Linear.from_float(torch.nn.Linear(96, 32), quant_type="nf4")  # 96 % 64 != 0
    assert not layer.use_native_blocks() and layer.native_blocks() is None


def test_repacked_llm_int8_layer_keeps_its_outlier_split(native_lib) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=True)
    layer = LLMInt8Linear.from_float(linear, threshold=6.0)
    x = torch.randn(4, 256)
    x[:, [7, 200]] = torch.tensor([50.0, -30.0])  # outlier features
    before, torch_path = layer.export_tensors(), layer(x)
    assert layer.use_native_blocks() and layer.weight_q is None
    # the same function: int8 codes times fp16 (not float32) row scales on the native kernel
    assert (layer(x) - torch_path).abs().max() <= 5e-4 * torch_path.abs().max()
    after = layer.export_tensors()
    assert all(torch.equal(before[name], after[name]) for name in before)
    # the outlier columns still go through float: without the split the error is far larger
    ref = x @ layer.dequantize().t() + linear.bias
    unsplit = LLMInt8Linear.from_float(linear, threshold=1e9)
    unsplit.use_native_blocks()
    assert (layer(x) - ref).norm() < 0.5 * (unsplit(x) - ref).norm()
