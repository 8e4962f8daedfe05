"""`--quantize METHOD` on a GGUF: the method re-quantizes the linears from float, while the token
embedding and output head, which it leaves alone, stay as the file stores them."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from lamina.api import LLM
from lamina.engine.fusion import attach_native
from lamina.kernels import native
from lamina.quant.apply import quantize_model
from lamina.quant.blockq import BlockQuantEmbedding, BlockQuantLinear
from lamina.quant.int8 import Int8Embedding, Int8Linear
from tests.models.gguf_writer import write_gguf
from tests.models.test_gguf_sentencepiece import spm_vocabulary

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64]])


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary padded with control tokens to a multiple of 16 rows (the native
    kernel's tile)."""
    tokens, scores, types = spm_vocabulary()
    pad = -len(tokens) % 16
    return tokens + [f"<pad{i}>" for i in range(pad)], scores + [0.0] * pad, types + [3] * pad


def write_tiny_gguf(path, tied: bool):
    """A 2-layer random Llama GGUF: token embedding (and an untied head) Q8_0, projections Q4_0."""
    spm = vocabulary()
    config = transformers.LlamaConfig(
        vocab_size=len(spm[0]), bos_token_id=1, eos_token_id=2, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()

    def type_of(name: str) -> str:
        return "Q8_0" if name.startswith(("token_embd", "output.")) else "Q4_0"

    return write_gguf(model, "llama", path, len(spm[0]), spm=spm, type_of=type_of)


def float_reference(path, method: str) -> LLM:
    """The GGUF expanded to float, then its linears quantized with `method` (head and embedding float)."""
    llm = LLM.load(path, quantize="none", fuse=False)
    quantize_model(llm.model, method)
    attach_native(llm.model)  # as LLM.load does after quantizing
    return llm


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_q8_0_tied_embedding_stays_blocks_under_a_method(native_lib, tmp_path, method: str) -> None:
    path = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    llm, reference = LLM.load(path, quantize=method, fuse=False), float_reference(path, method)
    embed, head = llm.model.input_embeddings(), llm.model.output_embeddings()
    assert isinstance(embed, BlockQuantEmbedding) and isinstance(head, BlockQuantLinear)
    assert embed.codes_tiled.data_ptr() == head.codes_tiled.data_ptr()  # one copy for both
    float_embed = reference.model.input_embeddings()
    assert torch.equal(embed(IDS), float_embed(IDS))  # rows exact: the file's Q8_0 values
    # the table at 34 bytes a block of 32 weights instead of 4 bytes a weight, nothing else changed
    saved = sum(reference.memory_footprint().values()) - sum(llm.memory_footprint().values())
    assert saved == float_embed.weight.numel() * (4 - 34 / 32)
    with torch.inference_mode():
        got, expected = llm.model(IDS), reference.model(IDS)
    # the projections are quantized identically; the Q8_0 head adds its int8 activations
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_an_untied_q8_0_head_stays_blocks_under_a_method(native_lib, tmp_path) -> None:
    path = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    llm, reference = LLM.load(path, quantize="int4", fuse=False), float_reference(path, "int4")
    embed, head = llm.model.input_embeddings(), llm.model.output_embeddings()
    assert isinstance(embed, BlockQuantEmbedding) and isinstance(head, BlockQuantLinear)
    assert embed.codes_tiled.data_ptr() != head.codes_tiled.data_ptr()
    assert torch.equal(head.dequantize(), reference.model.output_embeddings().weight)
    with torch.inference_mode():
        got, expected = llm.model(IDS), reference.model(IDS)
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_without_the_native_kernel_a_q8_0_embedding_becomes_int8(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    path = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    llm = LLM.load(path, quantize="int4", fuse=False)
    embed, head = llm.model.input_embeddings(), llm.model.output_embeddings()
    assert isinstance(embed, Int8Embedding) and isinstance(head, Int8Linear)
    assert head.weight_q.data_ptr() == embed.weight_q.data_ptr()


def test_quantize_none_still_expands_everything(native_lib, tmp_path) -> None:
    path = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    llm = LLM.load(path, quantize="none", fuse=False)
    assert type(llm.model.input_embeddings()) is nn.Embedding
    assert isinstance(llm.model.output_embeddings(), nn.Linear)  # the float32 mat-vec
