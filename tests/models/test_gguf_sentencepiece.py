"""SentencePiece-style GGUF vocabularies tokenize exactly as transformers' GGUF conversion does.

A tiny scored vocabulary (byte-fallback tokens, "▁"-prefixed pieces learned from CPython's docs,
a user-defined token) is written with `gguf.GGUFWriter` under several architectures, whose
tokenizer classes differ in how they treat spaces.
"""

from __future__ import annotations

import pytest

from lamina.loading.gguf_tokenizer import tokenizer_from_gguf

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "def f(x):\n    return x ** 2\n",
    "naïve café — ünïcödé ✓ 漢字",
    "<s> inside text </s> and <|user|> turn",
    "",
    "multiple   spaces\tand\ttabs",
    "three   and six      spaces",
]


def spm_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types of a small SentencePiece-style BPE vocabulary."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer_model.train_from_iterator(list(topics.values())[:40], trainers.BpeTrainer(vocab_size=400))
    learned = sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])
    pieces = [t for t, _ in learned]
    pieces += ["  ", "   "]  # Gemma files spell runs of spaces with real spaces
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "<|user|>", *pieces]
    types = [2, 3, 3, *[6] * 256, 4, *[1] * len(pieces)]
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


@pytest.fixture(scope="module")
def vocabulary():
    return spm_vocabulary()


def write_tokenizer_gguf(path, arch: str, vocabulary) -> None:
    import gguf

    tokens, scores, types = vocabulary
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_ids_equal_transformers_gguf_conversion(arch, vocabulary, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, arch, vocabulary)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    ours = tokenizer_from_gguf(metadata)
    for text in TEXTS:
        assert ours.encode(text).ids == reference.encode(text), text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == reference.decode(
            reference.encode(text)
        ), text
