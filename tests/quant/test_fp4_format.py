"""compressed-tensors NVFP4 and MXFP4 checkpoints (`lamina/quant/fp4_format.py`), compressed by
compressed-tensors' own `NVFP4PackedCompressor` / `MXFP4PackedCompressor` (`hub_packers.pack_fp4`); the
reference weights are its own unpacking times the scales (its `decompress` computes in bf16, so it is
compared within bf16's rounding)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

from lamina import LLM
from lamina.errors import CheckpointError
from lamina.kernels import native
from lamina.model_info import describe
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.half import HalfLinear
from lamina.quant.hub_scheme import hub_scheme
from tests.quant.hub_packers import FP4_WEIGHTS as WEIGHTS
from tests.quant.hub_packers import pack_fp4, write_quantized

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64, 128, 9]])
COMPRESSORS = {"nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor}


def write_fp4(
    src: Path, dst: Path, fmt: str, activations: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """src's projections as llm-compressor writes NVFP4A16 / MXFP4A16 (`fmt`), or with `activations`
    NVFP4 / MXFP4 (a static input global scale per layer); returns (the exact weights,
    compressed-tensors' own decompression)."""
    weights = WEIGHTS[fmt]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights, dynamic=False))
    decompressed = {}

    def pack(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        compressed, exact = pack_fp4(w, fmt)
        decompressed[f"{module}.weight"] = COMPRESSORS[fmt].decompress(compressed, scheme)["weight"].float()
        return compressed | ({"input_global_scale": torch.tensor([100.0])} if activations else {}), exact

    fp4_activations = {**weights, "dynamic": "local"} if activations else None
    group = {"targets": ["Linear"], "weights": weights, "input_activations": fp4_activations}
    config = {
        "quant_method": "compressed-tensors",
        "format": f"{fmt}-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    return write_quantized(src, dst, pack, config), decompressed


def logits(hf_model, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model = copy.deepcopy(hf_model)
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return model(IDS).logits[0]


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_checkpoint_loads_as_stored(tiny_models, tmp_path, fmt, kernels, request, monkeypatch) -> None:
    """On the native kernel: NVFP4 / MXFP4 blocks whose values are the stored ones but for NVFP4's d
    rounded to fp16 (MXFP4's powers of two are exact); without it, 16-bit weights."""
    if kernels:
        request.getfixturevalue("native_lib")
    else:
        monkeypatch.setattr(native, "library", lambda: None)
    hf_model, src = tiny_models["llama"]
    exact, decompressed = write_fp4(src, tmp_path / "m", fmt, activations=False)
    llm = LLM.load(tmp_path / "m", fuse=False)
    kind = BlockQuantLinear if kernels else HalfLinear
    layers = {name: m for name, m in llm.model.named_modules() if isinstance(m, kind)}
    assert len(layers) == len(exact) == 7 * 2
    assert not kernels or {m.ggml_type for m in layers.values()} == {fmt.upper()}
    for name, w in exact.items():
        got = layers[name.removesuffix(".weight")].dequantize()
        if kernels and fmt == "mxfp4":
            assert torch.equal(got, w)
        assert torch.allclose(got, w, rtol=2**-11, atol=0)  # d (or each weight) rounded to fp16
        assert torch.allclose(got, decompressed[name], rtol=2**-8, atol=0)  # its bf16 decompression
    expected = logits(hf_model, exact)
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    # measured (of the largest logit) NVFP4 1.8e-4 with the kernel (d in fp16, its int8 activations) and
    # 1.3e-4 without (each weight in fp16), MXFP4 1.5e-5 and 0; 4-bit rounding itself moves them 8%
    assert torch.allclose(got, expected, rtol=0, atol=1e-3 * expected.abs().max())
    unquantized = logits(hf_model, {})
    assert not torch.allclose(got, unquantized, rtol=0, atol=0.02 * unquantized.abs().max())


@pytest.mark.parametrize(
    ("fmt", "described"),
    [
        ("nvfp4", "nvfp4 (e2m1 weights, an e4m3 scale per 16 and a global scale, fp4 activations)"),
        ("mxfp4", "mxfp4 (e2m1 weights, a power-of-two scale per 32, fp4 activations)"),
    ],
)
def test_fp4_activations_are_skipped_and_info_names_the_format(
    tiny_models, tmp_path, native_lib, fmt, described
) -> None:
    """NVFP4 / MXFP4 (W4A4): the input global scales are skipped, the activations stay float32."""
    hf_model, src = tiny_models["llama"]
    exact, _ = write_fp4(src, tmp_path / "m", fmt, activations=True)
    llm = LLM.load(tmp_path / "m", fuse=False)
    expected = logits(hf_model, exact)
    with torch.no_grad():
        got = llm.model(IDS)[0]
    assert torch.allclose(got, expected, rtol=0, atol=1e-3 * expected.abs().max())
    info = describe(tmp_path / "m")
    assert info.quantization == f"compressed-tensors {described}"
    assert info.stored_types[f"COMPRESSED-TENSORS {fmt.upper()}"] == info.linear_parameters
    assert info.kept_bytes() == sum(llm.memory_footprint().values())


def test_fp4_problems_are_named(tiny_models, tmp_path) -> None:
    cases = {
        "nvfp4 group 32": (
            "nvfp4",
            {**WEIGHTS["nvfp4"], "group_size": 32},
            None,
            "tensor_group groups of 16",
        ),
        "mxfp4 group 16": ("mxfp4", {**WEIGHTS["mxfp4"], "group_size": 16}, None, "group groups of 32"),
        "int activations": ("nvfp4", WEIGHTS["nvfp4"], {"num_bits": 8, "type": "int"}, "other than to FP4"),
    }
    for what, (fmt, weights, activations, needle) in cases.items():
        groups = {"g": {"weights": weights, "input_activations": activations}}
        config = {
            "quant_method": "compressed-tensors",
            "format": f"{fmt}-pack-quantized",
            "config_groups": groups,
        }
        with pytest.raises(CheckpointError, match=needle) as err:
            hub_scheme({"quantization_config": config})
        assert "\n" not in str(err.value), what
    write_fp4(tiny_models["llama"][1], tmp_path / "m", "nvfp4", activations=False)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight_scale"] = state[
        "model.layers.0.mlp.up_proj.weight_scale"
    ].float()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight_scale is torch\.float32"):
        LLM.load(tmp_path / "m")
