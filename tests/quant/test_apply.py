"""quantize_model on a tiny random Llama: which layers change, generation end to end, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lamina.engine.generate import generate_tokens
from lamina.engine.sampling import SamplingParams
from lamina.errors import InvalidArgumentError
from lamina.quant.apply import METHODS, quantize_model, quantized_layers
from lamina.quant.base import QuantizedLinear

PROMPT = [1, 17, 42, 99, 3]


def calibration() -> list[torch.Tensor]:
    return [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_generation_end_to_end(tiny_model: nn.Module, method: str) -> None:
    ids = torch.tensor([PROMPT])
    ref = tiny_model(ids)[0, -1]
    quantize_model(tiny_model, method, group_size=32, calibration=calibration())
    layers = quantized_layers(tiny_model)
    assert len(layers) == 2 * 7  # every projection of both layers
    assert type(tiny_model.lm_head) is nn.Linear  # the output head stays float
    assert type(tiny_model.model.embed_tokens) is nn.Embedding
    logits = tiny_model(ids)[0, -1]
    cos = torch.nn.functional.cosine_similarity(logits, ref, dim=0)
    assert cos > (0.99 if "int8" in method else 0.9), (
        f"{method}: logits drifted from the float model's (cosine {cos:.3f})"
    )
    tokens = list(generate_tokens(tiny_model, PROMPT, 6, SamplingParams(temperature=0)))
    assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)


def test_unknown_method_lists_the_valid_ones(tiny_model: nn.Module) -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown quantization method 'int3'.*int8.*nf4-dq.*gptq"):
        quantize_model(tiny_model, "int3")


def test_group_size_that_does_not_divide_falls_back_with_a_warning(tiny_model: nn.Module) -> None:
    with pytest.warns(
        UserWarning, match="group size 128 does not divide in_features=64; .* use group size 64"
    ):
        quantize_model(tiny_model, "int4", group_size=128)
    assert tiny_model.get_submodule("model.layers.0.mlp.down_proj").group_size == 128  # in_features 128
    assert tiny_model.get_submodule("model.layers.0.mlp.up_proj").group_size == 64


def test_group_size_that_fits_nothing_names_the_layer() -> None:
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(80, 16))
    with pytest.raises(
        InvalidArgumentError, match=r"group size 64 does not divide in_features=80 of layer odd"
    ):
        quantize_model(model, "int4", group_size=64)


def test_unsupported_group_size(tiny_model: nn.Module) -> None:
    with pytest.raises(InvalidArgumentError, match="use one of"):
        quantize_model(tiny_model, "int4", group_size=48)


def test_gptq_without_calibration_is_an_error(tiny_model: nn.Module) -> None:
    with pytest.raises(InvalidArgumentError, match="calibration"):
        quantize_model(tiny_model, "gptq", group_size=32, calibration=[])


def test_progress_is_reported_per_layer(tiny_model: nn.Module) -> None:
    seen: list[str] = []
    quantize_model(tiny_model, "int8", progress=seen.append)
    assert len(seen) == 14 and seen[0] == "model.layers.0.self_attn.q_proj"
    assert all(isinstance(tiny_model.get_submodule(n), QuantizedLinear) for n in seen)
