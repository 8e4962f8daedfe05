"""Checkpoints saved by transformers with bitsandbytes load as stored (`lamina/quant/bnb_format.py`).

The checkpoints are the real thing: transformers quantizes a tiny model with bitsandbytes on the CPU
(`BitsAndBytesConfig`) and `save_pretrained` writes it; the reference logits are that quantized
transformers model's, and layer values are compared with `bitsandbytes.functional`'s dequantization.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina import LLM
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.model_info import describe
from lamina.quant.bnb_format import bnb_linear
from lamina.quant.int4 import unpack_nibbles
from lamina.quant.int8 import Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import NF4Linear, dynamic_map

VARIANTS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64, 128, 9]])


@pytest.fixture(scope="module")
def bnb_checkpoints(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """variant -> (directory transformers saved, that quantized model's logits for IDS)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, src = tiny_models["llama"]
    made = {}
    for variant, options in VARIANTS.items():
        config = BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes' notes on CPU kernels and fp16 casts
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
            directory = tmp_path_factory.mktemp(variant)
            model.save_pretrained(directory)  # before running it: see test_absmax_saved_after_a_cpu_run
            with torch.no_grad():
                logits = model(IDS).logits[0]
        for tokenizer_file in src.glob("tokenizer*"):
            shutil.copy(tokenizer_file, directory)
        made[variant] = (directory, logits)
    return made


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_the_bitsandbytes_model(bnb_checkpoints, tiny_models, variant) -> None:
    directory, expected = bnb_checkpoints[variant]
    llm = LLM.load(directory, fuse=False)  # one module per stored layer, to count them
    with torch.no_grad():
        got = llm.model(IDS)[0]  # [T, vocab]
    # measured: 2.2e-3 (4-bit) and 2.4e-3 (int8) of the largest logit; bitsandbytes rounds its
    # dequantized weights (and int8's activations) to fp16, Lamina's native kernel its activations to int8
    assert torch.allclose(got, expected, rtol=0, atol=0.01 * expected.abs().max())
    kind = LLMInt8Linear if variant == "int8" else NF4Linear
    layers = [m for m in llm.model.modules() if isinstance(m, kind)]
    assert len(layers) == 7 * 2  # every decoder projection, kept quantized
    if variant == "int8":
        assert all(m.threshold == 6.0 for m in layers)
    else:  # far from the float model, so the tolerance above tells the two apart
        with torch.no_grad():
            unquantized = tiny_models["llama"][0](IDS).logits[0]
        assert not torch.allclose(got, unquantized, rtol=0, atol=0.02 * unquantized.abs().max())


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", True)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_layer_values_are_bitsandbytes_dequantization_exactly(quant_type, double_quant, blocksize) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.linspace(0.01, 1, 256)  # blocks of different ranges
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    tensors = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()} | {"weight": packed}
    layer = bnb_linear(tensors, (48, 256), "layer", None, threshold=6.0)
    assert isinstance(layer, NF4Linear)
    assert torch.equal(layer.dequantize(), bnb_functional.dequantize_4bit(packed, state).float())


def test_double_quantization_is_bitsandbytes() -> None:
    """Lamina's nf4-dq stores what bitsandbytes' does: its dynamic map, offset, scales and codes."""
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * torch.linspace(0.01, 1, 256)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    layer = NF4Linear.from_float(_linear(weight), double_quant=True)
    bnb_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=-1).reshape(96, 256)
    assert torch.equal(unpack_nibbles(layer.packed_codes()), bnb_codes)
    assert torch.equal(layer.absmax_offset, state.offset.reshape(1))
    assert torch.equal(layer.absmax_scales, state.state2.absmax)
    same = layer.absmax_q == state.absmax
    # bitsandbytes 0.50's CPU kernel looks codes up in a table that once here picks the farther code
    assert same.float().mean() >= 0.99
    bnb_absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(layer.block_absmax()[same], bnb_absmax[same])


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    linear.weight.copy_(weight)
    return linear


def test_absmax_saved_after_a_cpu_run() -> None:
    """bitsandbytes' CPU forward turns a state's absmax into bf16 [rows, blocks]; saved so, it still loads."""
    weight = torch.randn(32, 128)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    tensors = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()} | {"weight": packed}
    tensors["weight.absmax"] = state.absmax.bfloat16().reshape(32, 2)
    layer = bnb_linear(tensors, (32, 128), "layer", None, threshold=6.0)
    state.absmax = state.absmax.bfloat16().float()
    assert torch.equal(layer.dequantize(), bnb_functional.dequantize_4bit(packed, state).float())


def test_eight_bit_values_and_a_zero_threshold() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    scb = weight.abs().amax(dim=1)  # bitsandbytes' SCB: each row's absmax
    q = torch.round(weight / scb[:, None] * 127).to(torch.int8)
    tensors = {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    layer = bnb_linear(tensors, (32, 64), "layer", None, threshold=0.0)
    assert type(layer) is Int8Linear  # no outlier split: plain int8
    assert torch.allclose(layer.dequantize(), q.float() * scb[:, None] / 127, rtol=1e-6, atol=0)
    with pytest.raises(CheckpointError, match=r"weight_format is \[2\]"):
        bnb_linear(
            {**tensors, "weight_format": torch.tensor(2, dtype=torch.uint8)}, (32, 64), "layer", None, 6.0
        )


def test_info_and_options(bnb_checkpoints) -> None:
    directory, _ = bnb_checkpoints["nf4-dq"]
    info = describe(directory)
    assert info.quantization == "bitsandbytes nf4 (4-bit, double-quantized)"
    assert info.stored_types["BNB NF4"] == info.linear_parameters
    loaded = LLM.load(directory, fuse=False)
    assert all(m.double_quant for m in loaded.model.modules() if isinstance(m, NF4Linear))  # codes kept
    # the estimate leaves out each layer's float32 offset and its last, partial group of 256 absmax
    assert 0 <= sum(loaded.memory_footprint().values()) - info.kept_bytes() <= 14 * 8
    int8 = describe(bnb_checkpoints["int8"][0])  # the estimate leaves out one float32 scale per row
    loaded = sum(LLM.load(bnb_checkpoints["int8"][0], fuse=False).memory_footprint().values())
    assert loaded - int8.kept_bytes() == 4 * 2 * 512  # a float32 scale for each of 512 rows a layer
    assert (
        describe(bnb_checkpoints["int8"][0]).quantization
        == "bitsandbytes LLM.int8 (8-bit, outlier threshold 6)"
    )
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        LLM.load(directory, quantize="int4")


def test_damaged_bitsandbytes_layers_are_clear_errors(bnb_checkpoints, tmp_path) -> None:
    source, _ = bnb_checkpoints["nf4-dq"]
    name = "model.layers.0.mlp.up_proj.weight"
    cases = {
        "quant_map": lambda s: s.__setitem__(f"{name}.quant_map", s[f"{name}.quant_map"] * 2),
        "absmax": lambda s: s.pop(f"{name}.absmax"),
        "state": lambda s: s.__setitem__(
            f"{name}.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"), dtype=torch.uint8)
        ),
    }
    cases["state bytes"] = lambda s: s.__setitem__(
        f"{name}.quant_state.bitsandbytes__nf4", torch.tensor([300, 1])
    )
    needles = {
        "quant_map": "code book",
        "absmax": "up_proj.weight.absmax",
        "state": "not JSON",
        "state bytes": "not JSON",
    }
    for case, damage in cases.items():
        directory = tmp_path / case
        shutil.copytree(source, directory)
        state = load_file(str(directory / "model.safetensors"))
        damage(state)
        save_file(state, str(directory / "model.safetensors"))
        with pytest.raises(CheckpointError, match=needles[case]) as err:
            LLM.load(directory)
        assert "\n" not in str(err.value)


def test_an_inconsistent_bitsandbytes_config_is_refused(bnb_checkpoints, tmp_path) -> None:
    shutil.copytree(bnb_checkpoints["fp4"][0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"]["load_in_8bit"] = True  # both
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="neither or both of load_in_4bit and load_in_8bit"):
        LLM.load(tmp_path / "m")
