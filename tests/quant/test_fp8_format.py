"""FP8 checkpoints (`lamina/quant/fp8_format.py`): transformers' FineGrainedFP8 layout, written here as
its loader reads it (e4m3 `weight`, float32 `weight_scale_inv` per block, w = weight * scale_inv), and
compressed-tensors' float-quantized, written and decompressed by compressed-tensors itself. On the
native kernels they stay 8-bit (`Fp8Linear`), elsewhere 16-bit weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

from lamina import LLM
from lamina.errors import CheckpointError
from lamina.kernels import native
from lamina.model_info import describe
from lamina.quant.fp8 import Fp8Linear
from lamina.quant.half import HalfLinear
from lamina.quant.hub_scheme import hub_scheme
from tests.quant.hub_packers import E4M3_MAX, block_scales, pack_fp8_blocks, write_quantized

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64, 128, 9]])


def write_transformers_fp8(src: Path, dst: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """src's projections as FineGrainedFP8 saves them; returns the float32 weights they stand for."""

    def pack(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        q, scale_inv, reference = pack_fp8_blocks(w, *block)
        return {"weight": q, "weight_scale_inv": scale_inv}, reference

    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return write_quantized(src, dst, pack, config)


def write_compressed_tensors_fp8(src: Path, dst: Path, strategy: str) -> dict[str, torch.Tensor]:
    """src's projections compressed by compressed-tensors (float-quantized, FP8-dynamic-like config);
    returns its own decompression of each."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    weights |= {"block_structure": [32, 32]} if strategy == "block" else {}
    activations = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))

    def pack(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        scale = (
            block_scales(w, 32, 32)
            if strategy == "block"
            else w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
            if strategy == "channel"
            else w.abs().amax().reshape(1) / E4M3_MAX
        )
        compressed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        return compressed, FloatQuantizationCompressor.decompress(compressed, scheme)["weight"].float()

    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    return write_quantized(src, dst, pack, config)


def reference_logits(hf_model, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model = copy.deepcopy(hf_model)
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return model(IDS).logits[0]


@pytest.mark.parametrize(
    ("kind", "option"),
    [
        ("transformers", (32, 32)),
        ("transformers", (48, 40)),
        ("ct", "channel"),
        ("ct", "tensor"),
        ("ct", "block"),
    ],
)
@pytest.mark.parametrize("kernels", [True, False])
def test_fp8_checkpoints_load_as_stored(
    tiny_models, tmp_path, kind, option, kernels, request, monkeypatch
) -> None:
    """With the native kernels: 8-bit layers, exactly the stored values (but for blocks 40 wide, which
    the kernel cannot step through 16 at a time: 16-bit weights); without: 16-bit weights."""
    if kernels:
        request.getfixturevalue("native_lib")
    else:
        monkeypatch.setattr(native, "library", lambda: None)
    hf_model, src = tiny_models["llama"]
    if kind == "transformers":  # (48, 40): blocks that do not divide the 64 / 128-wide layers
        reference = write_transformers_fp8(src, tmp_path / "m", option)
    else:
        reference = write_compressed_tensors_fp8(src, tmp_path / "m", option)
    llm = LLM.load(tmp_path / "m", fuse=False)
    eight_bit = kernels and option != (48, 40)
    kind_of_layer = Fp8Linear if eight_bit else HalfLinear
    layers = {name: m for name, m in llm.model.named_modules() if isinstance(m, kind_of_layer)}
    assert len(layers) == len(reference) == 7 * 2
    for name, w in reference.items():
        got = layers[name.removesuffix(".weight")].dequantize()
        if eight_bit:  # the e4m3 bytes and scales as stored
            assert torch.equal(got, w)
        else:  # each weight rounded once to float16
            assert torch.allclose(got, w, rtol=2**-11, atol=2**-25)  # float16 subnormals: steps of 2^-24
    expected = reference_logits(hf_model, reference)
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    assert torch.allclose(got, expected, rtol=0, atol=1e-3 * expected.abs().max())
    with torch.no_grad():
        unquantized = hf_model(IDS).logits[0]
    assert not torch.allclose(got, unquantized, rtol=0, atol=1e-3 * unquantized.abs().max())


def test_info_names_fp8_and_its_loaded_size(tiny_models, tmp_path, native_lib) -> None:
    write_transformers_fp8(tiny_models["llama"][1], tmp_path / "m", (32, 32))
    info = describe(tmp_path / "m")
    assert info.quantization == "fp8 (e4m3 weights, a scale per 32x32 block)"
    assert info.stored_types["FP8"] == info.linear_parameters
    assert info.kept_bytes() == sum(LLM.load(tmp_path / "m", fuse=False).memory_footprint().values())


def test_fp8_problems_are_named(tiny_models, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="weight_block_size"):
        hub_scheme({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}})
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    weights = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}
    with pytest.raises(CheckpointError, match="strategy 'group'"):
        hub_scheme({"quantization_config": {**ct, "config_groups": {"g": {"weights": weights}}}})
    write_transformers_fp8(tiny_models["llama"][1], tmp_path / "m", (32, 32))
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight_scale_inv is \(3, 3\)"):
        LLM.load(tmp_path / "m")


@pytest.mark.parametrize("damage", ["nan code", "infinite scale"])
def test_non_finite_fp8_weights_are_named(tiny_models, tmp_path, damage: str) -> None:
    write_transformers_fp8(tiny_models["llama"][1], tmp_path / "m", (32, 32))
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    if damage == "nan code":
        codes = state["model.layers.1.mlp.down_proj.weight"].view(torch.uint8).clone()
        codes[3, 5] = 0xFF  # e4m3fn's negative NaN
        state["model.layers.1.mlp.down_proj.weight"] = codes.view(torch.float8_e4m3fn)
    else:
        state["model.layers.1.mlp.down_proj.weight_scale_inv"][0, 1] = float("inf")
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj's fp8 weights or scales hold NaN or infinite"):
        LLM.load(tmp_path / "m")
