"""T5 GGUFs (llama.cpp's `t5`: `enc.blk.N.*`, `dec.blk.N.*`) load to transformers' logits and greedy tokens.

The files are written from the tiny T5s of test_t5 (original T5: ReLU `wi`, tied head scaled by
d_model**-0.5; Flan-T5: gated GELU `wi_0`/`wi_1`, own head) with F16 matrices, so transformers runs
the same F16-rounded weights. llama.cpp fixes the bucketing distance at T5's default of 128.
The tokenizer (tokenizer.ggml.model "t5", a SentencePiece Unigram vocabulary) must give the ids of
transformers' GGUF conversion of the same file.
"""

from __future__ import annotations

import pytest
import torch

from lamina.cli import main
from lamina.engine.sampling import SamplingParams
from lamina.engine.seq2seq import generate_seq2seq_tokens
from lamina.errors import CheckpointError
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.gguf_tokenizer import tokenizer_from_gguf
from tests.models.gguf_writer import add_unigram_vocabulary, f16_rounded, write_gguf
from tests.models.test_gguf_sentencepiece import TEXTS
from tests.models.test_parity import load_lamina
from tests.models.test_t5 import PROMPT, T5_CONFIGS, tiny_t5
from tests.models.tiny import VOCAB


@pytest.fixture(scope="module", params=sorted(T5_CONFIGS))
def pair(request, tmp_path_factory):
    reference = f16_rounded(tiny_t5(request.param, relative_attention_max_distance=128))
    path = write_gguf(reference, "t5", tmp_path_factory.mktemp(request.param) / "t5.gguf", VOCAB)
    return reference, load_lamina(path), path


def test_config_follows_the_file(pair):
    reference, model, path = pair
    with open_checkpoint(path) as checkpoint:
        config = checkpoint.config
    assert config["feed_forward_proj"] == reference.config.feed_forward_proj
    # an output matrix in the file: Flan-T5's own head; none: original T5's tied, scaled one
    assert config["tie_word_embeddings"] == reference.config.scale_decoder_outputs
    assert model.config.scale_decoder_outputs == reference.config.scale_decoder_outputs


def test_logits_match_transformers(pair):
    reference, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(model(ids, decoder_ids), expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    reference, model, _ = pair
    with torch.no_grad():
        expected = reference.generate(PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, 1:]
    tokens = generate_seq2seq_tokens(model, PROMPT[0].tolist(), 20, SamplingParams(temperature=0))
    assert list(tokens) == expected.tolist()


def test_missing_hyperparameter_is_named(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_key_length", lambda self, length: None)
    path = write_gguf(tiny_t5("flan_t5"), "t5", tmp_path / "bad.gguf", VOCAB)
    with pytest.raises(CheckpointError, match=r"lacks t5\.attention\.key_length; the file is incomplete"):
        load_lamina(path)


def unigram_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types of a small T5-style Unigram vocabulary: pad, EOS and
    unknown at T5's ids 0-2, pieces learned from CPython's docs, then 104 `[PADn]` placeholders
    (the first 100 are T5's sentinels) as llama.cpp's converter writes them."""
    import json
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_model = Tokenizer(models.Unigram())
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    trainer_model.train_from_iterator(list(topics.values())[:40], trainer)
    learned = json.loads(trainer_model.to_str())["model"]["vocab"]  # [[piece, score], ...], specials first
    tokens = [piece for piece, _ in learned] + [f"[PAD{len(learned) + i}]" for i in range(104)]
    scores = [score for _, score in learned] + [-10000.0] * 104
    types = [3, 3, 2] + [1] * (len(learned) - 3) + [5] * 104  # control, unknown, normal, unused
    return tokens, scores, types


@pytest.fixture(scope="module")
def vocabulary():
    return unigram_vocabulary()


T5_TEXTS = [
    *TEXTS,
    "translate English to German: <extra_id_0> the </s> house<unk>",
    "\u2581 odd \u2581\u2581 marks",
]


def test_tokenizer_ids_equal_transformers_gguf_conversion(vocabulary, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "t5")
    add_unigram_vocabulary(writer, *vocabulary)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "tok.gguf"))
    ours = tokenizer_from_gguf({name: field.contents() for name, field in reader.fields.items()})
    for text in T5_TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


def test_cli_generates_from_a_t5_gguf(vocabulary, tmp_path, capsys):
    model = f16_rounded(tiny_t5("flan_t5", vocab_size=len(vocabulary[0])))
    path = write_gguf(model, "t5", tmp_path / "flan.gguf", len(vocabulary[0]), spm=vocabulary)
    argv = ["generate", "--model", str(path), "-p", "Translate this", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "new tokens: 4" in capsys.readouterr().err
