"""K-quants (Q2_K to Q6_K), Q5_0 / Q5_1 and IQ4_NL / IQ4_XS become native blocks: values as gguf
dequantizes them, within the stated roundings, and a GGUF made of them loads without a float copy of
its matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, quants

from lamina.errors import UnsupportedModelError
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty, load_weights
from lamina.quant.base import QuantizedLinear
from lamina.quant.blockq import BlockQuantEmbedding, BlockQuantLinear, blockq_linear_from_gguf
from lamina.quant.gguf_convert import (
    converted_blocks,
    q2_k_blocks,
    q3_k_blocks,
    q4_k_blocks,
    q5_k_blocks,
    q6_k_blocks,
)
from lamina.quant.load import loading_claim
from tests.models.gguf_writer import random_kquant, write_gguf
from tests.models.test_parity import load_lamina
from tests.models.tiny import VOCAB

SHAPE = (32, 512)


def gguf_values(data: np.ndarray, ggml_type: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[ggml_type])).reshape(SHAPE)


@pytest.mark.parametrize(("ggml_type", "block_format", "top"), [("Q4_K", "Q4_1", 15), ("Q5_K", "Q5_1", 31)])
def test_q4_k_and_q5_k_codes_and_scales_are_gguf_values(ggml_type: str, block_format: str, top: int) -> None:
    data = random_kquant(SHAPE, ggml_type, np.random.default_rng(0))
    blocks = (q4_k_blocks if ggml_type == "Q4_K" else q5_k_blocks)(data, SHAPE)
    assert blocks["codes"].max() == top
    codes = blocks["codes"].float().reshape(32, -1, 32)  # [N, K/32, 32]
    exact = codes * blocks["d"][..., None] + blocks["m"][..., None]
    assert torch.equal(exact.reshape(SHAPE), gguf_values(data, ggml_type))  # in float32, exactly
    # the kernel's fp16 scale and min: each within 2^-11 relative of the sub-block's
    layer = blockq_linear_from_gguf(data, ggml_type, SHAPE)
    assert layer.ggml_type == block_format
    bound = 2**-11 * (top * blocks["d"].abs() + blocks["m"].abs())  # [N, K/32]
    error = (layer.dequantize() - exact.reshape(SHAPE)).abs().reshape(32, -1, 32).amax(-1)
    assert torch.all(error <= bound)


def test_q2_k_codes_scales_and_mins_are_gguf_values() -> None:
    data = random_kquant(SHAPE, "Q2_K", np.random.default_rng(5))
    blocks = q2_k_blocks(data, SHAPE)
    assert blocks["codes"].max() == 3
    codes = blocks["codes"].float().reshape(32, -1, 16)  # [N, K/16, 16]
    exact = codes * blocks["d"][..., None] + blocks["m"][..., None]
    assert torch.equal(exact.reshape(SHAPE), gguf_values(data, "Q2_K"))  # in float32, exactly
    layer = blockq_linear_from_gguf(data, "Q2_K", SHAPE)
    assert (layer.ggml_type, layer.scale_block) == ("Q2_K", 16)
    error = (layer.dequantize() - exact.reshape(SHAPE)).abs().reshape(32, -1, 16).amax(-1)
    assert torch.all(error <= 2**-11 * (3 * blocks["d"].abs() + blocks["m"].abs()))


@pytest.mark.parametrize(("ggml_type", "offset"), [("Q6_K", 32), ("Q3_K", 4)])
def test_q6_k_and_q3_k_codes_and_scales_are_gguf_values(ggml_type: str, offset: int) -> None:
    data = random_kquant(SHAPE, ggml_type, np.random.default_rng(1))
    blocks = (q6_k_blocks if ggml_type == "Q6_K" else q3_k_blocks)(data, SHAPE)
    assert blocks["codes"].max() == 2 * offset - 1
    codes = blocks["codes"].float().reshape(32, -1, 16) - offset  # [N, K/16, 16]
    exact = codes * blocks["d"][..., None]
    assert torch.equal(exact.reshape(SHAPE), gguf_values(data, ggml_type))  # in float32, exactly
    layer = blockq_linear_from_gguf(data, ggml_type, SHAPE)
    assert (layer.ggml_type, layer.scale_block) == (ggml_type, 16)
    error = (layer.dequantize() - exact.reshape(SHAPE)).abs().reshape(32, -1, 16).amax(-1)
    assert torch.all(error <= 2**-11 * offset * blocks["d"].abs())  # the fp16 scale, times |q - offset|


def test_iq4_nl_is_exact_and_iq4_xs_within_its_fp16_scales(native_lib) -> None:
    for ggml_type, bound in (("IQ4_NL", 0.0), ("IQ4_XS", 2**-11)):
        data = random_kquant(SHAPE, ggml_type, np.random.default_rng(4))
        layer = blockq_linear_from_gguf(data, ggml_type, SHAPE)
        assert (layer.ggml_type, layer.native_blocks()[5] is not None) == ("IQ4_NL", True)  # a code book
        values = gguf_values(data, ggml_type)
        error = (layer.dequantize() - values).abs().reshape(32, -1, 32).amax(-1)  # [N, K/32]
        assert torch.all(error <= bound * values.abs().reshape(32, -1, 32).amax(-1))
        x = torch.randn(3, SHAPE[1])
        want = x @ values.t()
        assert (layer(x) - want).abs().max() <= (bound + 1e-4) * want.abs().max()  # + x's two int8 passes


def test_mxfp4_is_exact(native_lib) -> None:
    rng = np.random.default_rng(6)
    data = quants.quantize((rng.standard_normal(SHAPE) * 0.02).astype(np.float32), GGMLQuantizationType.MXFP4)
    layer = blockq_linear_from_gguf(data, "MXFP4", SHAPE)
    assert (layer.ggml_type, layer.native_blocks()[5] is not None) == ("MXFP4", True)  # a code book
    values = gguf_values(data, "MXFP4")
    assert torch.equal(layer.dequantize(), values)
    x = torch.randn(3, SHAPE[1])
    want = x @ values.t()
    assert (layer(x) - want).abs().max() <= 1e-4 * want.abs().max()  # x's two int8 passes


def test_nvfp4_is_exact(native_lib) -> None:
    data = random_kquant(SHAPE, "NVFP4", np.random.default_rng(7))
    layer = blockq_linear_from_gguf(data, "NVFP4", SHAPE)
    assert (layer.ggml_type, layer.scale_block, layer.native_blocks()[5] is not None) == ("NVFP4", 16, True)
    values = gguf_values(data, "NVFP4")
    assert torch.equal(layer.dequantize(), values)
    x = torch.randn(3, SHAPE[1])
    want = x @ values.t()
    assert (layer(x) - want).abs().max() <= 1e-4 * want.abs().max()  # x's two int8 passes


@pytest.mark.parametrize("exponent", [200, 90])  # 2^72 (beyond fp16), 2^-38 (fp16 would flush it to 0)
def test_mxfp4_scales_beyond_fp16_are_not_converted(exponent: int) -> None:
    data = quants.quantize(np.full(SHAPE, 0.01, dtype=np.float32), GGMLQuantizationType.MXFP4).copy()
    data.reshape(-1, 17)[3, 0] = exponent
    assert converted_blocks(data, "MXFP4", SHAPE) is None


def test_widths_off_the_super_block_are_refused_by_name() -> None:
    data = np.zeros((16, 2 * 144), dtype=np.uint8)  # two Q4_K super-blocks a row, but 384 columns
    with pytest.raises(UnsupportedModelError, match=r"Q4_K with 384 columns.*multiple of their block"):
        converted_blocks(data, "Q4_K", (16, 384))
    with pytest.raises(UnsupportedModelError, match="Q8_K"):  # llama.cpp's internal activation type
        converted_blocks(data, "Q8_K", (16, 256))


def test_scales_beyond_fp16_are_not_converted() -> None:
    data = random_kquant(SHAPE, "Q4_K", np.random.default_rng(2)).copy()
    data.reshape(-1, 144)[0, 0:2] = np.array([60000.0], dtype=np.float16).view(np.uint8)  # d * sc > 65504
    data.reshape(-1, 144)[0, 4] = 63  # the first sub-block's 6-bit scale at its largest
    assert converted_blocks(data, "Q4_K", SHAPE) is None
    assert blockq_linear_from_gguf(data, "Q4_K", SHAPE) is None


def write_mixed_gguf(path: Path, layers: int = 2, types: dict[str, str] | None = None) -> Path:
    """A tiny random Llama GGUF with one matrix kind per converted type (Q8_0, Q4_0 and Q4_1 are the
    default model's: tests/kernels), or `types` (GGUF matrix name -> type; the rest Q4_K); K-quant and
    grid codes are random (`random_kquant`)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    if types is None:
        types = {
            "attn_v": "Q6_K",
            "ffn_down": "Q4_K",
            "attn_k": "Q5_0",
            "attn_output": "Q5_1",
            "output": "Q3_K",
        }
        types |= {"ffn_up": "Q5_K", "attn_q": "IQ4_XS", "ffn_gate": "IQ4_NL", "token_embd": "Q2_K"}

    def type_of(name: str) -> str:
        return next((t for key, t in types.items() if f"{key}.weight" in name), "Q4_K")

    return write_gguf(reference, "llama", path, VOCAB, type_of=type_of)


def test_a_gguf_of_every_kept_type_loads_as_blocks(native_lib, tmp_path) -> None:
    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    kept, expanded = load_kept(path), load_lamina(path)
    linears = {name: type(m) for name, m in kept.named_modules() if "proj" in name or name == "lm_head"}
    assert linears and all(kind is BlockQuantLinear for kind in linears.values()), linears
    assert isinstance(kept.input_embeddings(), BlockQuantEmbedding)
    assert not any(isinstance(m, QuantizedLinear) for m in expanded.modules())
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = kept(ids), expanded(ids)
        # The loader's wiring: the float model given the blocks' own weights (fp16 sub-block scales
        # included) matches up to the activations' two int8 passes (measured 1.8e-3 of the largest
        # logit: this random model's K-quant weights all lean one way, through random mins, and
        # amplify every error).
        for name, module in kept.named_modules():
            if isinstance(module, (BlockQuantLinear, BlockQuantEmbedding)):
                expanded.get_submodule(name).weight.copy_(module.dequantize())
        assert (kept(ids) - expanded(ids)).abs().max() <= 5e-3 * want.abs().max()
    # Against gguf's values, add the fp16 sub-block scales (2^-11 relative, bounded per format above):
    # measured 0.96% of the largest logit here (0.015% with only Q4_K, 1% with only Q2_K). A misplaced
    # code or scale moves the logits by their own size.
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


GRID_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"]


@pytest.mark.parametrize("ggml_type", GRID_TYPES)
def test_grid_types_become_book_codes_exactly(ggml_type: str) -> None:
    data = random_kquant(SHAPE, ggml_type, np.random.default_rng(4))
    block_format, blocks = converted_blocks(data, ggml_type, SHAPE)
    assert block_format == ggml_type  # 4-bit codes into the grid's book (a scale per 16: IQ1_M, IQ2_XS/_S)
    got = BlockQuantLinear.from_blocks(block_format, **blocks).dequantize()
    want = gguf_values(data, ggml_type)
    # codes exact, each block's step rounded to fp16 (2^-11 relative; 2^-25 absolute, times the
    # code, where a small block's step is below fp16's normal range)
    assert ((got - want).abs() <= 2**-11 * want.abs() + 62 * 2**-25).all()
    # plain Q8_0 (d = largest / 127) would not be exact: the step search is what makes the codes so
    plain = torch.from_numpy(quants.quantize(want.numpy(), GGMLQuantizationType.Q8_0))
    plain = torch.from_numpy(quants.dequantize(plain.numpy(), GGMLQuantizationType.Q8_0)).reshape(SHAPE)
    assert ((plain - want).abs() > 2**-11 * want.abs()).any() or ggml_type.startswith("TQ")


def test_a_gguf_of_grid_types_and_mxfp4_loads_as_blocks(native_lib, tmp_path) -> None:
    types = {
        "output": "MXFP4",
        "token_embd": "NVFP4",
        "ffn_down": "IQ3_S",
        "ffn_gate": "IQ2_XXS",
        "ffn_up": "IQ3_XXS",
        "attn_q": "IQ1_S",
        "attn_k": "TQ2_0",
        "attn_v": "IQ2_XS",
        "attn_output": "IQ2_S",
    }
    path = write_mixed_gguf(tmp_path / "grids.gguf", types=types)
    kept, expanded = load_kept(path), load_lamina(path)
    kinds = {
        name: type(m)
        for name, m in kept.named_modules()
        if name.endswith(
            ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "lm_head")
        )
    }
    assert kinds and all(kind is BlockQuantLinear for kind in kinds.values()), kinds
    assert kept.lm_head.ggml_type == "MXFP4"
    assert isinstance(kept.input_embeddings(), BlockQuantEmbedding)  # NVFP4
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = kept(ids), expanded(ids)
    # exact codes, fp16 steps and the activations' two int8 passes (the mixed-type test above: 0.96%)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def load_kept(path) -> torch.nn.Module:
    """The GGUF loaded as `LLM.load` does on CPU: its matrices claimed as blocks."""
    with open_checkpoint(path) as checkpoint:
        model, _ = build_empty(checkpoint)
        claim = loading_claim(model, checkpoint, None, torch.device("cpu"), torch.float32)
        load_weights(model, checkpoint, torch.float32, "cpu", claim=claim)
    return model.eval()
