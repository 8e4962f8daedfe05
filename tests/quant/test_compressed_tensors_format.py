"""compressed-tensors (llm-compressor) pack-quantized (int4, int8) and int-quantized (int8, W8A8)
checkpoints load as stored (`hub_formats.py`).

The codes are packed by compressed-tensors' own `pack_to_int32`; the reference logits are the model
with each layer decompressed by compressed-tensors' own compressors (`PackedQuantizationCompressor`,
`IntQuantizationCompressor`), and transformers loads the same directories (it reads this version's
packed asymmetric zero points with the wrong shape, so that check is on symmetric checkpoints).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

from lamina import LLM
from lamina.errors import CheckpointError
from lamina.model_info import describe
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.hub_scheme import hub_scheme
from tests.quant.hub_packers import write_quantized

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64, 128, 9]])


W8A8_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def quantize_int(w: torch.Tensor, group_size: int, symmetric: bool, bits: int = 4):
    """compressed-tensors' int convention: q in -2^(bits-1)..2^(bits-1)-1, w ~ s (q - zp); returns
    (q, s, zp) int8 / float."""
    n, k = w.shape
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wg = w.reshape(n, k // group_size, group_size)  # [N, G, group]
    if symmetric:
        s = wg.abs().amax(-1) / (highest + 0.5)
        zp = torch.zeros_like(s, dtype=torch.int8)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = (hi - lo) / (highest - lowest)
        zp = (torch.round(-lo / s) + lowest).clamp(lowest, highest).to(torch.int8)
    q = (torch.round(wg / s[..., None]) + zp[..., None]).clamp(lowest, highest).to(torch.int8)
    return q.reshape(n, k), s, zp


def write_checkpoint(
    src: Path,
    dst: Path,
    strategy: str,
    symmetric: bool,
    bits: int = 4,
    fmt: str = "pack-quantized",
    activations: dict | None = None,
) -> dict[str, torch.Tensor]:
    """src's decoder projections as llm-compressor writes a w4a16 / w8a16 model (format pack-quantized)
    or, with `fmt` int-quantized, a w8a8 one (int8 weights as they are, activations per `activations`);
    returns the weights they stand for, s (q - zp)."""

    def pack(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        group = 32 if strategy == "group" else w.shape[1]
        q, s, zp = quantize_int(w, group, symmetric, bits)
        s = s.to(torch.bfloat16)  # llm-compressor keeps the model's dtype
        parts = {"weight_scale": s}
        if activations and not activations["dynamic"]:  # a static per-tensor activation scale
            parts["input_scale"] = torch.tensor([0.05], dtype=torch.bfloat16)
        if fmt == "int-quantized":
            parts["weight"] = q
            parts |= {} if symmetric else {"weight_zero_point": zp}
        else:
            parts["weight_packed"] = pack_to_int32(q, bits)
            parts["weight_shape"] = torch.tensor(list(w.shape))
            parts |= {} if symmetric else {"weight_zero_point": pack_to_int32(zp, bits, packed_dim=0)}
        per_weight = s.float().repeat_interleave(group, dim=1)  # [N, K]
        return parts, per_weight * (q.float() - zp.float().repeat_interleave(group, dim=1))

    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": strategy,
        "dynamic": False,
    }
    weights |= {"group_size": 32} if strategy == "group" else {}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    return write_quantized(src, dst, pack, config)


def decompressed_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Each packed layer's weight as compressed-tensors' own decompression gives it, by name."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**config["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = config["format"] == "pack-quantized"
    compressor = PackedQuantizationCompressor if packed else IntQuantizationCompressor
    stored = load_file(str(directory / "model.safetensors"))
    weights = {}
    for name in [n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")]:
        parts = {k.removeprefix(f"{name}."): v for k, v in stored.items() if k.startswith(f"{name}.weight")}
        # bf16 scales widened (exactly): the decompression then computes in float32, not bf16
        parts = {k: v.float() if v.is_floating_point() else v for k, v in parts.items()}
        weights[f"{name}.weight"] = compressor.decompress(parts, scheme)["weight"].float()
    return weights


def decompressed_logits(hf_model, directory: Path) -> torch.Tensor:
    """Logits of `hf_model` with each packed layer replaced by compressed-tensors' own decompression."""
    model = copy.deepcopy(hf_model)
    model.load_state_dict(decompressed_weights(directory), strict=False)
    with torch.no_grad():
        return model(IDS).logits[0]


@pytest.mark.parametrize(("strategy", "symmetric"), [("group", True), ("group", False), ("channel", True)])
def test_logits_match_compressed_tensors_decompression(tiny_models, tmp_path, strategy, symmetric) -> None:
    hf_model, src = tiny_models["llama"]
    weights = write_checkpoint(src, tmp_path / "ct", strategy, symmetric)
    expected = decompressed_logits(hf_model, tmp_path / "ct")
    with torch.no_grad():
        unquantized = hf_model(IDS).logits[0]
    for name, w in decompressed_weights(tmp_path / "ct").items():  # the packer's s (q - zp), exactly
        assert torch.equal(weights[name], w), name
    llm = LLM.load(tmp_path / "ct", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    # measured: 1.4e-4 of the largest logit (the native kernel's int8 activations)
    assert torch.allclose(got, expected, rtol=0, atol=0.005 * expected.abs().max())
    assert not torch.allclose(got, unquantized, rtol=0, atol=0.02 * unquantized.abs().max())
    blocks = [m for m in llm.model.modules() if isinstance(m, BlockQuantLinear)]
    assert len(blocks) == 7 * 2
    assert {m.ggml_type for m in blocks} == {"Q4_0" if symmetric else "Q4_1"}


@pytest.mark.parametrize(
    ("strategy", "symmetric", "fmt"),
    [
        ("channel", True, "pack-quantized"),
        ("group", False, "pack-quantized"),
        ("channel", True, "int-quantized"),
        ("group", False, "int-quantized"),
    ],
)
def test_8_bit_logits_match_compressed_tensors_decompression(
    tiny_models, tmp_path, strategy, symmetric, fmt
) -> None:
    hf_model, src = tiny_models["llama"]
    activations = W8A8_ACTIVATIONS if fmt == "int-quantized" else None
    write_checkpoint(src, tmp_path / "ct", strategy, symmetric, bits=8, fmt=fmt, activations=activations)
    expected = decompressed_logits(hf_model, tmp_path / "ct")
    llm = LLM.load(tmp_path / "ct", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    # measured: 1.1e-5 (symmetric) and 9.3e-5 (m = s (128 - z) rounded to fp16) of the largest logit;
    # 8-bit rounding itself moves them 3.8e-3 and 4.1e-3 from the float model's
    assert torch.allclose(got, expected, rtol=0, atol=3e-4 * expected.abs().max())
    blocks = [m for m in llm.model.modules() if isinstance(m, BlockQuantLinear)]
    assert len(blocks) == 7 * 2
    assert {m.ggml_type for m in blocks} == {"Q8_0" if symmetric else "Q8_M"}
    info = describe(tmp_path / "ct")
    assert info.quantization.startswith("compressed-tensors 8-bit")
    assert info.quantization.endswith("int8 activations") == (activations is not None)
    assert info.stored_types["COMPRESSED-TENSORS 8-bit"] == info.linear_parameters
    assert info.kept_bytes() == sum(llm.memory_footprint().values())


@pytest.mark.parametrize(
    ("bits", "fmt", "activations"),
    [
        (8, "int-quantized", {**W8A8_ACTIVATIONS, "dynamic": False, "strategy": "tensor"}),
        (4, "pack-quantized", W8A8_ACTIVATIONS),
    ],
)
def test_int8_activations_are_read_and_not_applied(tiny_models, tmp_path, bits, fmt, activations) -> None:
    """w8a8 with static activation scales (`input_scale`: skipped with the claimed layer) and w4a8: the layers
    compute the decompressed weights' products, activations float as in a weight-only checkpoint."""
    hf_model, src = tiny_models["llama"]
    write_checkpoint(src, tmp_path / "ct", "channel", True, bits=bits, fmt=fmt, activations=activations)
    expected = decompressed_logits(hf_model, tmp_path / "ct")
    llm = LLM.load(tmp_path / "ct", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    assert torch.allclose(got, expected, rtol=0, atol=0.005 * expected.abs().max())
    assert describe(tmp_path / "ct").quantization.endswith("int8 activations")


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_reads_the_checkpoints_as_lamina_does(tiny_models, tmp_path, bits) -> None:
    """The config and tensors written here are what transformers + compressed-tensors load."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(tiny_models["llama"][1], tmp_path / "ct", "group", True, bits=bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", device_map="cpu")
    with torch.no_grad():
        expected = reference(IDS).logits[0]
        got = LLM.load(tmp_path / "ct").model(IDS)[0]
    assert torch.allclose(got, expected, rtol=0, atol=0.005 * expected.abs().max())


def test_info_names_the_scheme(tiny_models, tmp_path) -> None:
    write_checkpoint(tiny_models["llama"][1], tmp_path / "ct", "group", True)
    info = describe(tmp_path / "ct")
    assert info.quantization == "compressed-tensors 4-bit, group size 32"
    assert info.stored_types["COMPRESSED-TENSORS 4-bit"] == info.linear_parameters


def test_schemes_lamina_cannot_read_are_named() -> None:
    base = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    cases = {
        "marlin-24": ({**base, "format": "marlin-24"}, weights, None),
        "2 bits": (base, {**weights, "num_bits": 2}, None),
        "fp8 activations": (base, weights, {**W8A8_ACTIVATIONS, "type": "float"}),
        "int4 int-quantized": ({**base, "format": "int-quantized"}, weights, None),
        "group 16": (base, {**weights, "group_size": 16}, None),
        "tensor": (base, {**weights, "strategy": "tensor"}, None),
    }
    needles = {
        "marlin-24": "marlin-24",
        "2 bits": "2-bit",
        "fp8 activations": "activations quantized other than to int8",
        "int4 int-quantized": "int-quantized: 8-bit",
        "group 16": "strategy 'group'",
        "tensor": "strategy 'tensor'",
    }
    for what, (top, w, activations) in cases.items():
        config = {**top, "config_groups": {"g": {"weights": w, "input_activations": activations}}}
        with pytest.raises(CheckpointError, match=needles[what]) as err:
            hub_scheme({"quantization_config": config})
        assert "\n" not in str(err.value), what


def test_wrong_stored_shape_is_named(tiny_models, tmp_path) -> None:
    write_checkpoint(tiny_models["llama"][1], tmp_path / "ct", "group", True)
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight_shape"] = torch.tensor([64, 64])
    save_file(state, str(tmp_path / "ct" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight_shape is \[64, 64\]"):
        LLM.load(tmp_path / "ct")
