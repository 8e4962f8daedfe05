"""Save -> load gives identical outputs; broken scheme files are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file, save_file
from torch import nn

from lamina.api import LLM
from lamina.engine.fusion import fuse_projections
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.apply import quantize_model, set_submodule
from lamina.quant.blockq import blockq_linear_from_gguf
from lamina.quant.checkpoint import (
    SCHEME_FILE,
    WEIGHTS_FILE,
    load_quantized_into,
    read_scheme,
    save_quantized,
)

from .conftest import tiny_config

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def reload(directory: Path) -> nn.Module:
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    load_quantized_into(model, directory)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "fp4-dq", "llm.int8", "bf16", "fp8"])
def test_save_load_identical_outputs(tiny_model: nn.Module, tmp_path: Path, method: str) -> None:
    quantize_model(tiny_model, method, group_size=32)
    save_quantized(tiny_model, tmp_path, method, group_size=32)
    assert read_scheme(tmp_path)["layers"]["model.layers.1.mlp.down_proj"]["method"] == method
    loaded = reload(tmp_path)
    # The packed CPU kernels crash on tensors that are not 64-byte aligned (safetensors can return such).
    assert all(b.data_ptr() % 64 == 0 for b in loaded.buffers())
    assert torch.equal(loaded(IDS), tiny_model(IDS))


def test_a_fused_model_is_refused_before_anything_is_written(tiny_model: nn.Module, tmp_path: Path) -> None:
    """Fused q/k/v and gate/up layers have no names the model loads by (it saved unloadable files before)."""
    quantize_model(tiny_model, "int8")
    fuse_projections(tiny_model)
    with pytest.raises(InvalidArgumentError, match=r"fused .*load it with fuse=False"):
        save_quantized(tiny_model, tmp_path / "q", "int8")
    assert not (tmp_path / "q").exists()


def test_kept_gguf_blocks_save_and_load(tiny_model: nn.Module, tmp_path: Path) -> None:
    """A model holding GGUF blocks as stored (`BlockQuantLinear`) saves and loads them exactly."""
    for name, module in list(tiny_model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            data = quants.quantize(module.weight.numpy(), GGMLQuantizationType.Q4_1)
            set_submodule(tiny_model, name, blockq_linear_from_gguf(data, "Q4_1", tuple(module.weight.shape)))
    save_quantized(tiny_model, tmp_path, "gguf")
    assert read_scheme(tmp_path)["layers"]["model.layers.0.self_attn.q_proj"]["ggml_type"] == "Q4_1"
    assert torch.equal(reload(tmp_path)(IDS), tiny_model(IDS))


def test_a_gguf_with_its_tied_embedding_kept_is_refused(default_gguf, tmp_path: Path) -> None:
    llm = LLM.load(default_gguf, device="cpu")
    with pytest.raises(InvalidArgumentError, match="keeps a GGUF's blocks quantized"):
        save_quantized(llm.model, tmp_path, "gguf")


def quantized_dir(model: nn.Module, tmp_path: Path) -> Path:
    quantize_model(model, "int4", group_size=32)
    return save_quantized(model, tmp_path, "int4", group_size=32)


def test_missing_scheme_file(tiny_model: nn.Module, tmp_path: Path) -> None:
    (quantized_dir(tiny_model, tmp_path) / SCHEME_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"quantized tensors but no {SCHEME_FILE}"):
        reload(tmp_path)


def test_scheme_with_unknown_method(tiny_model: nn.Module, tmp_path: Path) -> None:
    path = quantized_dir(tiny_model, tmp_path) / SCHEME_FILE
    scheme = json.loads(path.read_text())
    scheme["layers"]["model.layers.0.mlp.up_proj"]["method"] = "int3"
    path.write_text(json.dumps(scheme))
    with pytest.raises(CheckpointError, match="up_proj has unknown method 'int3'"):
        reload(tmp_path)


def test_scheme_disagrees_with_tensor_shapes(tiny_model: nn.Module, tmp_path: Path) -> None:
    path = quantized_dir(tiny_model, tmp_path) / SCHEME_FILE
    scheme = json.loads(path.read_text())
    scheme["layers"]["model.layers.0.mlp.up_proj"]["group_size"] = 64
    path.write_text(json.dumps(scheme))
    with pytest.raises(CheckpointError, match="up_proj: tensor scales_and_zeros has shape"):
        reload(tmp_path)


def test_scheme_layer_without_tensors(tiny_model: nn.Module, tmp_path: Path) -> None:
    weights = quantized_dir(tiny_model, tmp_path) / WEIGHTS_FILE
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.o_proj.qweight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"o_proj lacks tensors \['qweight'\]"):
        reload(tmp_path)


def test_quantized_tensors_no_layer_claims(tiny_model: nn.Module, tmp_path: Path) -> None:
    path = quantized_dir(tiny_model, tmp_path) / SCHEME_FILE
    scheme = json.loads(path.read_text())
    del scheme["layers"]["model.layers.0.mlp.gate_proj"]
    path.write_text(json.dumps(scheme))
    with pytest.raises(CheckpointError, match="do not account for"):
        reload(tmp_path)


def test_corrupt_scheme_file(tiny_model: nn.Module, tmp_path: Path) -> None:
    (quantized_dir(tiny_model, tmp_path) / SCHEME_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        reload(tmp_path)


def test_gguf_kept_model_cannot_be_saved(tiny_model: nn.Module, tmp_path: Path) -> None:
    from lamina.quant.int8 import Int8Embedding, quantize_per_channel

    tiny_model.model.embed_tokens = Int8Embedding(*quantize_per_channel(tiny_model.model.embed_tokens.weight))
    with pytest.raises(ValueError, match="quantize='none'"):
        save_quantized(tiny_model, tmp_path, "int8")
