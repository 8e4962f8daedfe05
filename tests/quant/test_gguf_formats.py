"""GGUF Q4_0 / Q4_1 / Q8_0 blocks -> Lamina layouts, checked against gguf's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lamina.errors import UnsupportedModelError
from lamina.quant.gguf_formats import (
    int4_linear_from_gguf,
    int8_linear_from_gguf,
    q4_codes,
    q8_0_values,
    tied_int8_from_gguf,
)

SHAPE = (48, 128)  # out_features, in_features


def gguf_blocks(qtype: GGMLQuantizationType, values: np.ndarray) -> np.ndarray:
    return quants.quantize(values.astype(np.float32), qtype)


def reference(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data, qtype)).reshape(SHAPE)


def bf16_exact_blocks(qtype: GGMLQuantizationType) -> np.ndarray:
    """Blocks whose d and min are bf16-representable (and so is m + 8 d): the layout is then exact."""
    rng = np.random.default_rng(0)
    per_block = 18 if qtype == GGMLQuantizationType.Q4_0 else 20
    blocks = rng.integers(0, 256, size=(SHAPE[0], SHAPE[1] // 32, per_block), dtype=np.uint8)
    d = (2.0 ** rng.integers(-8, -4, size=blocks.shape[:2])).astype(np.float16)  # powers of two
    blocks[..., 0:2] = d[..., None].view(np.uint8)
    if qtype == GGMLQuantizationType.Q4_1:
        m = (-d.astype(np.float32) * rng.integers(1, 16, size=d.shape)).astype(
            np.float16
        )  # small multiples of d
        blocks[..., 2:4] = m[..., None].view(np.uint8)
    return blocks.reshape(SHAPE[0], -1)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_q4_codes_and_scales_are_gguf_values_exactly(qtype: GGMLQuantizationType) -> None:
    data = gguf_blocks(qtype, np.random.default_rng(1).normal(size=SHAPE))
    codes, d, m = q4_codes(data, qtype.name, SHAPE)
    values = d.repeat_interleave(32, 1) * (codes.float() - (8 if m is None else 0))
    if m is not None:
        values = values + m.repeat_interleave(32, 1)
    assert torch.equal(values, reference(data, qtype))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_q4_in_int4_layout_is_exact_when_scales_fit_bf16(qtype: GGMLQuantizationType) -> None:
    data = bf16_exact_blocks(qtype)
    layer = int4_linear_from_gguf(data, qtype.name, SHAPE)
    assert layer.layout == "cpu" and layer.group_size == 32
    assert torch.equal(layer.dequantize(), reference(data, qtype))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_q4_in_int4_layout_within_bf16_rounding_otherwise(qtype: GGMLQuantizationType) -> None:
    data = gguf_blocks(qtype, np.random.default_rng(2).normal(size=SHAPE))
    layer = int4_linear_from_gguf(data, qtype.name, SHAPE)
    codes, d, m = q4_codes(data, qtype.name, SHAPE)
    assert torch.equal(layer.codes(), codes)  # the 4-bit codes are copied exactly
    zeros = torch.zeros_like(d) if m is None else m + 8 * d
    bound = (2**-8 * (d.abs() * 8 + zeros.abs())).repeat_interleave(32, 1) + 1e-7
    assert ((layer.dequantize() - reference(data, qtype)).abs() <= bound).all()


def test_q4_row_permutation_applies_to_codes_and_scales() -> None:
    qtype = GGMLQuantizationType.Q4_1
    data = bf16_exact_blocks(qtype)
    perm = torch.randperm(SHAPE[0])
    layer = int4_linear_from_gguf(data, qtype.name, SHAPE, permute_rows=lambda t: t[perm])
    assert torch.equal(layer.dequantize(), reference(data, qtype)[perm])


def test_q8_0_values_exact_and_int8_layout_within_a_row_step() -> None:
    qtype = GGMLQuantizationType.Q8_0
    data = gguf_blocks(qtype, np.random.default_rng(3).normal(size=SHAPE))
    ref = reference(data, qtype)
    assert torch.equal(q8_0_values(data, SHAPE), ref)
    layer = int8_linear_from_gguf(data, SHAPE)
    assert ((layer.dequantize() - ref).abs() <= layer.scales[:, None] / 2 + 1e-7).all()


def test_q8_0_is_exact_when_a_row_shares_one_scale() -> None:
    rows = np.random.default_rng(4).integers(-127, 128, size=SHAPE).astype(np.float32)
    rows[:, 0] = 127  # every block of every row has absmax 127 -> d = 1 everywhere
    rows[:, 32::32] = 127
    data = gguf_blocks(GGMLQuantizationType.Q8_0, rows * 0.125)
    layer = int8_linear_from_gguf(data, SHAPE)
    assert torch.equal(layer.dequantize(), reference(data, GGMLQuantizationType.Q8_0))


def test_tied_q8_0_embedding_and_head_share_one_copy() -> None:
    data = gguf_blocks(GGMLQuantizationType.Q8_0, np.random.default_rng(5).normal(size=SHAPE))
    embed, head = tied_int8_from_gguf(data, SHAPE)
    assert embed.weight_q.data_ptr() == head.weight_q.data_ptr()
    ids = torch.tensor([[0, 5, 47]])
    assert torch.equal(embed(ids)[0], head.dequantize()[ids[0]])


def test_unsupported_ggml_type_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match="Q4_K"):
        int4_linear_from_gguf(np.zeros((48, 100), np.uint8), "Q4_K", SHAPE)
