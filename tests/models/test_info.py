"""`lamina info` describes a checkpoint from its metadata, without reading a weight."""

from __future__ import annotations

import pytest
import torch

from lamina.cli import main
from lamina.loading.gguf import GGUFCheckpoint
from lamina.loading.hf_dir import HFDirectoryCheckpoint
from lamina.model_info import describe
from tests.models.gguf_writer import write_gguf
from tests.models.tiny import VOCAB, save_tiny, tiny_hf_model


@pytest.fixture(autouse=True)
def no_weight_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"lamina info read tensor {name}")

    monkeypatch.setattr(HFDirectoryCheckpoint, "read", refuse)
    monkeypatch.setattr(GGUFCheckpoint, "read", refuse)


def test_info_on_hf_directory(tmp_path, capsys):
    reference = save_tiny("gpt2", tmp_path)
    assert main(["info", str(tmp_path), "--context", "100"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "2 layers" in out
    assert f"({reference.num_parameters():,})" in out
    assert "F32 100%" in out and "context length: 256" in out
    assert "chat template:  no" in out and "tokenizer:      none" in out
    # KV cache: 2 layers x (k + v) x 64 features x 4 bytes x 100 tokens = 100 KiB in float32
    float32_row = next(line for line in out.splitlines() if line.strip().startswith("float32"))
    assert "100.0 KiB" in float32_row


def test_info_on_gguf(tmp_path, capsys):
    path = write_gguf(tiny_hf_model("gemma"), "gemma", tmp_path / "g.gguf", VOCAB)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GemmaForCausalLM" in out and "F16" in out and "F32" in out
    assert "tokenizer:      byte-level BPE" in out


def test_bad_context_is_an_error(tmp_path, capsys):
    save_tiny("gpt2", tmp_path)
    assert main(["info", str(tmp_path), "--context", "0"]) == 2
    assert "--context must be >= 1" in capsys.readouterr().err


def test_info_estimates_a_gguf_kept_quantized(capsys):
    """The default model as LLM.load keeps it on the native kernel: 96,576,768 bytes of weights
    (Q4_1 linears at 5 bits a weight, the Q8_0 embedding at 8.5, float32 norms)."""
    assert main(["info"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("as stored"))
    assert row.split()[2:4] == ["92.1", "MiB"]  # 96,576,768 bytes


def _linear_weight_numel(model) -> int:
    """Elements of the decoder layers' linear weights (those a CPU load keeps 16-bit when stored so)."""
    return sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )


def test_info_estimates_16_bit_linears_kept_16_bit(tmp_path):
    """An HF checkpoint stored in bfloat16 loads on a CPU with 16-bit linears (`quant/half.py`), its
    embedding and head 16-bit too, and the norms widened to float32; the "as stored" estimate is
    what the load takes (tests/quant/test_half.py compares it with a load)."""
    reference = tiny_hf_model("qwen3").to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    info = describe(tmp_path)
    assert info.stored_types == {"BF16": reference.num_parameters()}
    matrices = sum(p.numel() for p in reference.parameters() if p.dim() == 2)
    assert info.kept_bytes() == matrices * 2 + (reference.num_parameters() - matrices) * 4


def test_info_estimates_a_gguf_with_16_bit_matrices(tmp_path):
    """F16 matrices and the F16 embedding (with its tied head) stay 16-bit; F32 norms load as float32."""
    reference = tiny_hf_model("gemma")
    path = write_gguf(reference, "gemma", tmp_path / "m.gguf", VOCAB)
    matrices = sum(p.numel() for p in reference.parameters() if p.dim() == 2)
    assert describe(path).kept_bytes() == matrices * 2 + (reference.num_parameters() - matrices) * 4


def test_info_has_no_kept_estimate_for_float32_checkpoints(tmp_path):
    save_tiny("qwen3", tmp_path)
    assert describe(tmp_path).kept_bytes() is None
