"""GGUF blocks kept as they are (`BlockQuantLinear`) on the native block kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from lamina.errors import InvalidArgumentError
from lamina.kernels import native
from lamina.quant.blockq import (
    BlockQuantEmbedding,
    BlockQuantLinear,
    blockq_linear_from_gguf,
    code_values,
)
from lamina.quant.blocks import tile_codes, tile_scales, untile_codes, untile_scales

#: formats gguf quantizes to; RUNTIME_TYPES adds Q6_K's, Q3_K's and Q2_K's (a scale per 16 weights) and
#: IQ4_NL's, IQ3_S's, IQ2_XXS's, IQ2_XS's, MXFP4's and NVFP4's (code books; IQ2's have 6 values, IQ2_XS
#: and NVFP4 a scale per 16 weights), built from codes
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"]
RUNTIME_TYPES = [*TYPES, "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ3_S", "IQ2_XXS", "IQ2_XS", "MXFP4", "NVFP4"]


def random_layer(ggml_type: str, n: int, k: int, seed: int = 0) -> BlockQuantLinear:
    g = torch.Generator().manual_seed(seed)
    bits, _, has_m, scale_block = BlockQuantLinear.formats[ggml_type]
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // scale_block, generator=g) * 0.02).half().float()
    m = (torch.randn(n, k // scale_block, generator=g) * 0.05).half().float() if has_m else None
    return BlockQuantLinear.from_blocks(ggml_type, codes, d, m)


def two_pass_reference(x: torch.Tensor, layer: BlockQuantLinear) -> torch.Tensor:
    """What the kernel computes, in float64: each 32-block of x as d1 q1 + d2 q2 (the second int8
    pass quantizing what the first left over) times d * (c - offset), plus x's exact block sums
    times the block biases m. The codes are found in float32 as the kernel finds them (a code one
    step off moves a product by ~2^-14 of the block's range)."""
    blocks = x.double().reshape(x.shape[0], -1, 32)  # [M, K/32, 32]
    approx = torch.zeros_like(blocks)
    rest = x.float().reshape(blocks.shape)
    for _ in range(2):
        amax = rest.abs().amax(-1, keepdim=True)
        inverse = torch.where(amax > 0, 127 / amax, 0)  # float32, as the kernel's
        q = torch.round(rest * inverse)  # float32 product, rounded half to even
        scale = amax / 127
        approx += q.double() * scale.double()
        rest = (rest.double() - q.double() * scale.double()).float()  # the kernel's fused multiply-add
    scales = untile_scales(layer.d_tiled).double()  # [N, K/32] (Q6_K: [N, K/16])
    codes = code_values(layer.ggml_type, layer.codes(), layer.offset).double()  # [N, K]
    codes = codes.reshape(*scales.shape, -1)  # [N, K/32, 32] (Q6_K: [N, K/16, 16])
    y = approx.reshape(x.shape) @ (scales[..., None] * codes).reshape(layer.out_features, -1).t()
    if layer.m_tiled is not None:
        mins = untile_scales(layer.m_tiled).double()  # [N, K/32] (Q2_K: [N, K/16])
        sums = x.double().reshape(x.shape[0], mins.shape[1], -1).sum(-1)  # x's sum per block of m
        y += sums @ mins.t()  # [M, K/32] x [K/32, N]
    return y


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_tile_layout_round_trips(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (48, 96), dtype=torch.uint8)
    assert torch.equal(untile_codes(tile_codes(codes, bits), bits), codes)
    values = torch.randn(48, 3).half().float()
    assert torch.equal(untile_scales(tile_scales(values)), values)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_gguf_bytes_dequantize_to_gguf_values_exactly(ggml_type: str) -> None:
    qtype = GGMLQuantizationType[ggml_type]
    values = np.random.default_rng(1).standard_normal((32, 96)).astype(np.float32)
    data = quants.quantize(values, qtype)
    layer = blockq_linear_from_gguf(data, ggml_type, (32, 96))
    assert torch.equal(layer.dequantize(), torch.from_numpy(quants.dequantize(data, qtype)).reshape(32, 96))


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 7, 70])
def test_kernel_matches_the_two_pass_reference(native_lib, ggml_type: str, rows: int) -> None:
    layer = random_layer(ggml_type, 64, 192)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 192, generator=g) * torch.logspace(-3, 1, 192)  # blocks of very different scales
    y = layer(x)
    expected = two_pass_reference(x, layer)
    assert (y.double() - expected).abs().max() <= 2e-6 * expected.abs().max()
    # and close to the float product: two int8 passes leave ~2^-15 of each block's range
    exact = x.double() @ layer.dequantize().double().t()
    assert (y.double() - exact).abs().max() <= 1e-4 * exact.abs().max()


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
def test_rows_are_bit_identical_alone_or_together_and_across_thread_counts(
    native_lib, ggml_type: str
) -> None:
    """What lets speculative verify passes equal decode steps exactly."""
    layer = random_layer(ggml_type, 96, 128)
    x = torch.randn(9, 128)
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(9)])
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer(x), together)
    finally:
        torch.set_num_threads(threads)


def test_the_kernel_refuses_a_code_width_it_has_no_loop_for(native_lib) -> None:
    layer = random_layer("Q6_K", 16, 64)  # 6-bit codes, a scale per 16 weights
    d32 = layer.d_tiled[:, ::2].contiguous()  # the same codes claimed with a scale per 32
    with pytest.raises(ValueError, match="no kernel for 6-bit codes with 32 weights a scale"):
        native.blockq_matmul(torch.randn(1, 64), layer.codes_tiled, d32, None, 6, 32)


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q2_K"])
def test_a_dtype_cast_leaves_the_scales_the_kernel_reads(native_lib, ggml_type: str) -> None:
    """The kernel reads fp16 bits: a model cast to bfloat16 (or a loader's run dtype) must not convert them."""
    layer = random_layer(ggml_type, 32, 64)
    x = torch.randn(2, 64)
    before = layer(x)
    layer.to(torch.bfloat16)
    assert torch.equal(layer(x), before)


def test_fallback_without_the_kernel_computes_the_float_product(monkeypatch) -> None:
    values = np.random.default_rng(6).standard_normal((32, 64)).astype(np.float32)
    data = quants.quantize(values, GGMLQuantizationType.Q4_1)
    layer = blockq_linear_from_gguf(data, "Q4_1", (32, 64))
    layer.use_native = False  # as where the library cannot be built

    def refuse(*args: object) -> None:
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(native, "blockq_matmul", refuse)
    x = torch.randn(2, 64)
    weight = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q4_1)).reshape(32, 64)
    torch.testing.assert_close(layer(x), x @ weight.t())


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
def test_concatenated_layers_compute_each_layer(ggml_type: str) -> None:
    parts = [random_layer(ggml_type, n, 64, seed=n) for n in (32, 16, 48)]
    merged = BlockQuantLinear.concatenate(parts)
    assert merged.out_features == 96
    assert torch.equal(merged.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert (
        BlockQuantLinear.concatenate(
            [parts[0], random_layer("Q4_0" if ggml_type != "Q4_0" else "Q8_0", 16, 64)]
        )
        is None
    )


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
def test_export_and_rebuild_round_trip(ggml_type: str) -> None:
    layer = random_layer(ggml_type, 32, 64)
    rebuilt = BlockQuantLinear.from_tensors(64, 32, layer.scheme_config(), layer.export_tensors())
    assert torch.equal(rebuilt.dequantize(), layer.dequantize())


@pytest.mark.parametrize("ggml_type", RUNTIME_TYPES)
def test_embedding_rows_are_the_head_rows_exactly(ggml_type: str) -> None:
    head = random_layer(ggml_type, 48, 64)
    embedding = BlockQuantEmbedding(head)
    assert embedding.codes_tiled is head.codes_tiled  # one copy for both
    ids = torch.tensor([[0, 17, 47], [5, 5, 31]])
    assert torch.equal(embedding(ids), head.dequantize()[ids])


def test_row_permutation_applies_to_codes_and_scales() -> None:
    values = np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32)
    data = quants.quantize(values, GGMLQuantizationType.Q4_1)
    order = torch.randperm(32)
    permuted = blockq_linear_from_gguf(data, "Q4_1", (32, 64), lambda t: t[order])
    plain = blockq_linear_from_gguf(data, "Q4_1", (32, 64))
    assert torch.equal(permuted.dequantize(), plain.dequantize()[order])


def test_unavailable_kernels_say_why(monkeypatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert native.DISABLE_ENV in native.unavailable_reason()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_a_build_the_cpu_cannot_run_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "avx512")
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    native.library.cache_clear()
    try:
        assert native.supported_isas() == ["avx2"]
        assert native.library() is None
        lacks = "avx512f, avx512bw, avx512vl, avx512_vnni"
        assert native.unavailable_reason() == f"{native.DISABLE_ENV}=avx512 but this CPU lacks {lacks}"
        monkeypatch.delenv(native.DISABLE_ENV)
        monkeypatch.setattr(native, "_cpu_flags", lambda: {"neon", "asimd"})
        assert native.selected_isa() is None
        assert "neither AVX-512 VNNI nor AVX2" in native.unavailable_reason()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_an_unknown_kernel_setting_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "avx")
    native.library.cache_clear()
    try:
        with pytest.raises(InvalidArgumentError, match="LAMINA_NATIVE_KERNELS='avx' is not a setting; use 0"):
            native.library()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_a_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path) -> None:
    if not native.cpu_supported():
        pytest.skip("this CPU runs no build of the kernels")
    monkeypatch.setenv("LAMINA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DLAMINA_NO_SUCH_HEADER", "-include", "no_such.h"))
    native.library.cache_clear()
    native.load.cache_clear()
    try:
        assert native.library() is None
        assert "failed" in native.unavailable_reason()
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
        native.load.cache_clear()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_from_float_is_ggufs_own_quantization(ggml_type: str) -> None:
    linear = nn.Linear(64, 32, bias=True)
    layer = BlockQuantLinear.from_float(linear, ggml_type=ggml_type)
    data = quants.quantize(linear.weight.detach().numpy(), GGMLQuantizationType[ggml_type])
    expected = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[ggml_type])).reshape(32, 64)
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(layer.bias, linear.bias)
