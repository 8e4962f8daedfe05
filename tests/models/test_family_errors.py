"""Family checkpoints that are broken, or laid out like older Hub uploads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina.errors import CheckpointError, UnsupportedModelError
from tests.models.test_parity import load_lamina
from tests.models.tiny import LONGROPE_ORIGINAL_CONTEXT, VOCAB, save_tiny


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    return directory, save_tiny("gpt2", directory)


def test_unknown_architecture_lists_supported_families(gpt2_dir, tmp_path):
    directory, _ = gpt2_dir
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(load_file(directory / "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(
        UnsupportedModelError, match=r"MambaForCausalLM.*supported:.*GPT2LMHeadModel.*OPTForCausalLM"
    ):
        load_lamina(tmp_path)


def test_missing_weight_of_a_family_is_named(gpt2_dir, tmp_path):
    directory, _ = gpt2_dir
    tensors = load_file(directory / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_lamina(tmp_path)


def test_checkpoint_without_base_model_prefix_loads(gpt2_dir, tmp_path):
    """openai-community/gpt2 stores `h.0.attn.c_attn.weight`, not `transformer.h.0...`, plus mask buffers."""
    directory, reference = gpt2_dir
    tensors = {
        k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()
    }
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # the causal-mask buffer old checkpoints carry
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_lamina(tmp_path)(ids), reference(ids).logits)


def _phi3_longrope_as_first_released(directory, tmp_path, **changes) -> None:
    """Phi-3-mini-128k's first config.json: rope_scaling type "su", the original context beside it."""
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["partial_rotary_factor"] = rope["partial_rotary_factor"]
    config["rope_scaling"] = {
        "type": "su",
        "short_factor": rope["short_factor"],
        "long_factor": rope["long_factor"],
    }
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    save_file(load_file(directory / "model.safetensors"), tmp_path / "model.safetensors")


def test_phi3_su_rope_scaling_of_first_releases_loads(tmp_path):
    directory = tmp_path / "saved"
    reference = save_tiny("phi3_longrope", directory)
    _phi3_longrope_as_first_released(directory, tmp_path)
    ids = torch.randint(
        0, VOCAB, (1, LONGROPE_ORIGINAL_CONTEXT + 8), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        torch.testing.assert_close(load_lamina(tmp_path)(ids), reference(ids).logits)


def test_longrope_without_original_context_is_named(tmp_path):
    directory = tmp_path / "saved"
    save_tiny("phi3_longrope", directory)
    _phi3_longrope_as_first_released(directory, tmp_path, original_max_position_embeddings=None)
    with pytest.raises(CheckpointError, match="longrope' needs original_max_position_embeddings"):
        load_lamina(tmp_path)


def test_gemma2_config_without_layer_types_slides_every_other_layer(tmp_path):
    """Gemma 2's first config.json files have a window but no `layer_types`."""
    directory = tmp_path / "saved"
    reference = save_tiny("gemma2", directory)
    config = json.loads((directory / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(load_file(directory / "model.safetensors"), tmp_path / "model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))  # past the window
    with torch.no_grad():
        torch.testing.assert_close(load_lamina(tmp_path)(ids), reference(ids).logits)
