"""Lamina's Llama family against transformers on tiny random checkpoints, through the real loader."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.engine.generate import generate_tokens
from lamina.engine.sampling import SamplingParams
from tests.conftest import save_tiny_tokenizer

FAMILIES = ["llama", "mistral", "qwen2"]


def lamina_model(directory):
    return LLM.load(directory, device="cpu").model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family):
    reference, directory = tiny_models[family]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = lamina_model(directory)(ids)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_matches_single_file(tiny_models, tmp_path, family):
    reference, _ = tiny_models[family]
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    save_tiny_tokenizer(tmp_path)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lamina_model(tmp_path)(ids), reference(ids).logits)


def test_pytorch_bin_checkpoint_loads(tiny_models, tmp_path):
    """The legacy layout: config.json + pytorch_model.bin, read with torch.load(weights_only=True)."""
    reference, _ = tiny_models["qwen2"]
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    save_tiny_tokenizer(tmp_path)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lamina_model(tmp_path)(ids), reference(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_transformers(tiny_models, family):
    """20 greedy tokens from a 12-token prompt: longer than Mistral's window of 8 by the end."""
    reference, directory = tiny_models[family]
    prompt = torch.randint(2, 320, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference.generate(
            prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 12:].tolist()
    model = lamina_model(directory)
    actual = list(generate_tokens(model, prompt[0].tolist(), 20, SamplingParams(temperature=0)))
    assert actual == expected
