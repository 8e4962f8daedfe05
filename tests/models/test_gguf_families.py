"""GGUF files written from the tiny models, llama.cpp-style, load to the transformers model's logits.

Matrices are stored as F16, so logits are compared against transformers running the same
F16-rounded weights.
"""

from __future__ import annotations

import pytest
import torch

from lamina.errors import CheckpointError
from lamina.loading.checkpoint import open_checkpoint
from tests.models.gguf_writer import f16_rounded, write_gguf
from tests.models.test_parity import load_lamina
from tests.models.tiny import VOCAB, tiny_hf_model

GGUF_FAMILIES = {"qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma", "gpt2": "gpt2"}
# llama.cpp's qwen3 has no sliding window; real Qwen3 checkpoints switch it off too.
OVERRIDES = {"qwen3": {"use_sliding_window": False}}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_gguf_loads_to_transformers_logits(family, tmp_path):
    reference = f16_rounded(tiny_hf_model(family, **OVERRIDES.get(family, {})))
    path = write_gguf(reference, GGUF_FAMILIES[family], tmp_path / f"{family}.gguf", VOCAB)
    model = load_lamina(path)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_gguf_metadata_inconsistent_with_tensors_is_named(tmp_path):
    reference = tiny_hf_model("qwen3", use_sliding_window=False)
    reference.config.intermediate_size = 96  # the metadata now says 96; the tensors hold 128
    path = write_gguf(reference, "qwen3", tmp_path / "bad.gguf", VOCAB)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape \(128, 64\).*implies \(96, 64\)"):
        load_lamina(path)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.config["intermediate_size"] == 96
