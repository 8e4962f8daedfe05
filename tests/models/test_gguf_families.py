"""GGUF files written from the tiny models, llama.cpp-style, load to the transformers model's logits.

Matrices are stored as F16, so logits are compared against transformers running the same
F16-rounded weights. The HF config values llama.cpp assumes rather than stores are checked on
metadata alone.
"""

from __future__ import annotations

import pytest
import torch

from lamina.errors import CheckpointError
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.gguf_names import GGUF_ARCHITECTURES, hf_config_from_gguf
from lamina.loading.loader import build_empty, load_weights
from lamina.quant.base import QuantizedLinear
from lamina.quant.load import loading_claim
from tests.models.gguf_writer import f16_rounded, write_gguf
from tests.models.test_parity import load_lamina
from tests.models.tiny import VOCAB, tiny_hf_model

# test id -> (tiny family, llama.cpp architecture, config changes that make the tiny model one the
# GGUF can describe, as the real checkpoints of the family are)
GGUF_FAMILIES = {
    # llama.cpp's qwen3 has no sliding window; real Qwen3 checkpoints switch it off too
    "qwen3": ("qwen3", "qwen3", {"use_sliding_window": False}),
    "phi3": ("phi3", "phi3", {}),
    "phi3_longrope": ("phi3_longrope", "phi3", {}),  # factors as tensors, window 0 for none
    "gemma": ("gemma", "gemma", {}),
    # no query_pre_attn_scalar in the metadata: llama.cpp uses head_dim, as Gemma-2-2B/9B do
    "gemma2": ("gemma2", "gemma2", {"query_pre_attn_scalar": 16}),
    # llama.cpp fixes the pattern (5 sliding layers, then a global one)
    "gemma3": ("gemma3", "gemma3", {"num_hidden_layers": 6, "layer_types": None}),
    "gpt2": ("gpt2", "gpt2", {}),
    # llama.cpp writes feed_forward_length = 4 * hidden, which is Phi-2's
    "phi2": ("phi", "phi2", {"intermediate_size": 256}),
    "gptneox": ("gpt_neox", "gptneox", {}),
    "gptneox_sequential": ("gpt_neox_seq", "gptneox", {}),
    "bloom": ("bloom", "bloom", {}),
    "falcon7b": ("falcon7b", "falcon", {}),
    "falcon40b": ("falcon40b", "falcon", {}),
}


@pytest.mark.parametrize("case", sorted(GGUF_FAMILIES))
def test_gguf_loads_to_transformers_logits(case, tmp_path):
    family, arch, overrides = GGUF_FAMILIES[case]
    reference = f16_rounded(tiny_hf_model(family, **overrides))
    path = write_gguf(reference, arch, tmp_path / f"{case}.gguf", VOCAB)
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


def test_phi2_gguf_with_fused_qkv_loads(tmp_path):
    """GGUFs of Phi-2's first checkpoint keep q, k and v in one attn_qkv tensor; Phi keeps them apart."""
    reference = f16_rounded(tiny_hf_model("phi", intermediate_size=256))
    path = write_gguf(reference, "phi2", tmp_path / "phi2.gguf", VOCAB, fused_qkv=True)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(load_lamina(path)(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_falcon_qkv_kept_quantized_is_regrouped_like_the_float_read(tmp_path):
    """Q8_0 qkv blocks built straight into an int8 layer get the same row regrouping as a float read."""
    path = write_gguf(tiny_hf_model("falcon40b"), "falcon", tmp_path / "q8.gguf", VOCAB, matrix_type="Q8_0")
    with open_checkpoint(path) as checkpoint:
        model, _ = build_empty(checkpoint)
        claim = loading_claim(model, checkpoint, None, torch.device("cpu"), torch.float32)
        load_weights(model, checkpoint, torch.float32, "cpu", claim=claim)
    assert isinstance(model.transformer.h[0].self_attention.query_key_value, QuantizedLinear)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        kept, read = model(ids), load_lamina(path)(ids)
    assert (kept - read).norm() < 0.02 * read.norm()  # int8 re-quantization and bf16 activations only


def _config(arch: str, tensors: tuple[str, ...] = (), rope_factors=None, **hparams) -> dict:
    metadata = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in hparams.items()}}
    spec = GGUF_ARCHITECTURES[arch].for_file(tensors)
    return hf_config_from_gguf(metadata, spec, tensors, rope_factors)


@pytest.mark.parametrize(
    ("arch", "layers", "hidden", "heads", "head_dim", "scalar"),
    [
        ("gemma2", 26, 2304, 8, 256, 256),  # Gemma-2-2B: head_dim
        ("gemma2", 46, 4608, 32, 128, 144),  # Gemma-2-27B: hidden / heads
        ("gemma3", 34, 2560, 8, 256, 256),  # Gemma-3-4B
        ("gemma3", 62, 5376, 32, 128, 168),  # Gemma-3-27B
    ],
)
def test_gemma_score_scale_follows_llama_cpp(arch, layers, hidden, heads, head_dim, scalar):
    """The metadata has no query_pre_attn_scalar; llama.cpp's rule gives each published config's value."""
    config = _config(
        arch,
        block_count=layers,
        embedding_length=hidden,
        **{"attention.head_count": heads, "attention.key_length": head_dim, "attention.sliding_window": 4096},
    )
    assert config["query_pre_attn_scalar"] == scalar


def test_gemma3_slides_five_layers_per_global_one_when_the_file_has_a_window():
    head = {"block_count": 6, "embedding_length": 64, "attention.head_count": 4}
    config = _config("gemma3", **head, **{"attention.sliding_window": 512})
    assert (config["sliding_window_pattern"], config["rope_local_base_freq"]) == (6, 10000.0)
    config = _config("gemma3", **head)
    assert "sliding_window_pattern" not in config and "rope_local_base_freq" not in config


def test_longrope_factors_without_original_context_are_named():
    factors = {"short_factor": [1.0], "long_factor": [2.0]}
    with pytest.raises(CheckpointError, match=r"no rope\.scaling\.original_context_length"):
        _config("phi3", rope_factors=factors, block_count=1)
