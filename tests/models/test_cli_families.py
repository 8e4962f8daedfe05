"""`lamina generate` runs each kind of checkpoint end to end: HF directories and a SentencePiece GGUF."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.cli import main
from tests.conftest import save_tiny_tokenizer
from tests.models.gguf_writer import f16_rounded, write_gguf
from tests.models.test_gguf_sentencepiece import spm_vocabulary
from tests.models.tiny import save_tiny, tiny_hf_model


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "falcon7b"])
def test_generate_from_hf_directory(family, tmp_path, capsys):
    save_tiny(family, tmp_path)
    save_tiny_tokenizer(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "-p", "The", "--temperature", "0", "--max-new-tokens", "5"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "new tokens: 5" in capsys.readouterr().err


def test_generate_from_sentencepiece_gguf(tmp_path):
    """A Phi-3 GGUF with a scored vocabulary: tokenizer and weights both come from the file."""
    tokens, scores, types = spm_vocabulary()
    model = f16_rounded(tiny_hf_model("phi3", vocab_size=len(tokens), bos_token_id=1, eos_token_id=2))
    path = write_gguf(model, "phi3", tmp_path / "phi3.gguf", len(tokens), spm=(tokens, scores, types))
    llm = LLM.load(path, device="cpu")
    ids = llm.tokenizer.encode("Return the value")
    assert ids[0] == 1  # BOS, which llama.cpp adds to SentencePiece vocabularies by default
    expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0]
    text = llm.generate("Return the value", max_new_tokens=6, temperature=0)
    assert text == llm.tokenizer.decode(expected[len(ids) :].tolist())
