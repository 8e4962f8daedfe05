"""NF4 / FP4 code books are bitsandbytes' (index for index), so 4-bit codes are interchangeable."""

from __future__ import annotations

import torch

from lamina.quant.nf4 import FP4_CODE, NF4_CODE, NF4Linear

from .conftest import random_linear

# bitsandbytes csrc/kernels.cu dDequantizeNF4, codes 0b0000 .. 0b1111.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# bitsandbytes csrc/kernels.cu dDequantizeFP4Tree (sign bit 0b1000), codes 0b0000 .. 0b1111.
BNB_FP4 = [
    0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
    -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25,
]  # fmt: skip


def test_nf4_code_book_is_bitsandbytes() -> None:
    assert torch.equal(
        torch.tensor(NF4_CODE, dtype=torch.float32), torch.tensor(BNB_NF4, dtype=torch.float32)
    )


def test_fp4_code_book_is_bitsandbytes() -> None:
    assert torch.allclose(torch.tensor(FP4_CODE), torch.tensor(BNB_FP4), atol=1e-8)


def test_codes_index_the_book_like_bitsandbytes() -> None:
    """A block's absmax element maps to code 15 (NF4 +1.0) or 0b0011 / 0b1011 (FP4 +-1.0)."""
    lin = random_linear(in_features=64, out_features=16)
    lin.weight.data[0, 5] = 1.0  # the largest |w| of block 0, positive
    lin.weight.data[1, 9] = -1.0  # the largest |w| of block 1, negative
    for quant_type, pos, neg in (("nf4", 15, 0), ("fp4", 0b0011, 0b1011)):
        layer = NF4Linear.from_float(lin, quant_type=quant_type)
        codes = torch.stack([layer.weight_packed & 15, layer.weight_packed >> 4], -1).reshape(16, 64)
        assert int(codes[0, 5]) == pos and int(codes[1, 9]) == neg, quant_type
