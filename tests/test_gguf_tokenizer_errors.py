"""GGUF tokenizer metadata that cannot make a working tokenizer is one `CheckpointError` line naming
the file and the key, not an IndexError/KeyError traceback or silently garbled text.

Most cases build the tokenizer from a metadata dict (as read from a file); the last ones write a tiny
GGUF and go through `LLM.load` and the CLI, where the message names the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from lamina.api import LLM
from lamina.cli import main
from lamina.errors import CheckpointError
from lamina.loading.gguf_header import read_gguf
from lamina.loading.tokenizer import Tokenizer
from tests.models.gguf_writer import write_gguf
from tests.models.tiny import tiny_hf_model

DAMAGED = "the file's metadata is damaged, re-download or re-convert it"
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 one-character byte tokens


def byte_level(**changes: object) -> dict[str, object]:
    """The metadata of a small byte-level BPE vocabulary ("gpt2"): the byte alphabet, two merged
    tokens and an end-of-text control token, with `changes` applied (None removes a key)."""
    tokens = [*ALPHABET, "Ġt", "he", "<|endoftext|>"]
    metadata: dict[str, object] = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.bos_token_id": len(tokens) - 1,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def sentencepiece(kind: str = "llama", arch: str = "llama", **changes: object) -> dict[str, object]:
    """A small SentencePiece vocabulary ("llama" BPE with scores, or "t5" Unigram)."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "▁the", "▁a", "t", "h", "e"]
    metadata: dict[str, object] = {
        "general.architecture": arch,
        "tokenizer.ggml.model": kind,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,
    }
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def test_good_metadata_builds() -> None:
    for metadata in (byte_level(), sentencepiece(), sentencepiece(arch="gemma"), sentencepiece(kind="t5")):
        tokenizer = Tokenizer.from_gguf_metadata(metadata, "m.gguf")
        assert tokenizer.decode(tokenizer.encode("the a", add_special_tokens=False)) == "the a"


def test_the_bundled_gguf_passes(default_gguf: Path) -> None:
    metadata, _ = read_gguf(default_gguf)
    assert Tokenizer.from_gguf_metadata(metadata, str(default_gguf)).eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        # special-token ids outside the vocabulary were an IndexError (gguf_tokenizer / tokenizer.py)
        (
            byte_level(**{"tokenizer.ggml.bos_token_id": 999999, "tokenizer.ggml.add_bos_token": True}),
            f"m.gguf: tokenizer.ggml.bos_token_id 999999 is outside its 259 tokens; {DAMAGED}",
        ),
        (
            byte_level(**{"tokenizer.ggml.eos_token_id": 259}),
            f"m.gguf: tokenizer.ggml.eos_token_id 259 is outside its 259 tokens; {DAMAGED}",
        ),
        (
            byte_level(**{"tokenizer.ggml.eos_token_id": -1}),
            f"m.gguf: tokenizer.ggml.eos_token_id -1 is outside its 259 tokens; {DAMAGED}",
        ),
        (
            byte_level(**{"tokenizer.ggml.eos_token_id": "2"}),
            f"m.gguf: tokenizer.ggml.eos_token_id is '2', not a token id; {DAMAGED}",
        ),
        (
            sentencepiece(arch="gemma", **{"tokenizer.ggml.unknown_token_id": 5000}),
            f"m.gguf: tokenizer.ggml.unknown_token_id 5000 is outside its 265 tokens; {DAMAGED}",
        ),
        (
            sentencepiece(kind="t5", **{"tokenizer.ggml.padding_token_id": 265}),
            f"m.gguf: tokenizer.ggml.padding_token_id 265 is outside its 265 tokens; {DAMAGED}",
        ),
        (
            sentencepiece(kind="t5", **{"tokenizer.ggml.unknown_token_id": 700}),
            f"m.gguf: tokenizer.ggml.unknown_token_id 700 is outside its 265 tokens; {DAMAGED}",
        ),
        # no vocabulary was a KeyError
        (
            byte_level(**{"tokenizer.ggml.tokens": None, "tokenizer.ggml.token_type": None}),
            "m.gguf has no tokenizer (tokenizer.ggml.tokens); Lamina needs one to read and write text",
        ),
        (
            byte_level(**{"tokenizer.ggml.tokens": [], "tokenizer.ggml.token_type": []}),
            f"m.gguf: tokenizer.ggml.tokens is not a list of token strings; {DAMAGED}",
        ),
        # lists that must parallel the tokens were a ValueError from zip(strict=True)
        (
            byte_level(**{"tokenizer.ggml.token_type": [1, 1]}),
            f"m.gguf: tokenizer.ggml.token_type has 2 entries for 259 tokens; {DAMAGED}",
        ),
        (
            sentencepiece(**{"tokenizer.ggml.scores": [0.0]}),
            f"m.gguf: tokenizer.ggml.scores has 1 entries for 265 tokens; {DAMAGED}",
        ),
        (
            byte_level(**{"tokenizer.ggml.merges": ["Ġt"]}),
            f'm.gguf: tokenizer.ggml.merges is not a list of "LEFT RIGHT" pairs; {DAMAGED}',
        ),
        # the tokenizers library's own bare Exception
        (
            byte_level(**{"tokenizer.ggml.merges": ["x yz"]}),
            "m.gguf: cannot build the tokenizer from its metadata (Error while initializing BPE: "
            f"Token `yz` out of vocabulary); {DAMAGED}",
        ),
    ],
)
def test_damaged_metadata_is_named(metadata: dict[str, object], message: str) -> None:
    with pytest.raises(CheckpointError) as error:
        Tokenizer.from_gguf_metadata(metadata, "m.gguf")
    assert str(error.value) == message


def test_byte_level_bpe_without_merges_is_refused() -> None:
    """Without merges every word splits into single bytes: text the model reads as garbage (it loaded
    and answered `.com/2`)."""
    with pytest.raises(
        CheckpointError, match=r"^m\.gguf has a byte-level BPE tokenizer .* without its merges"
    ):
        Tokenizer.from_gguf_metadata(byte_level(**{"tokenizer.ggml.merges": None}), "m.gguf")
    # A vocabulary of single bytes (plus control tokens) needs no merges.
    tokens = [*ALPHABET, "<|endoftext|>"]
    plain = byte_level(
        **{
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3],
            "tokenizer.ggml.merges": None,
            "tokenizer.ggml.bos_token_id": 256,
            "tokenizer.ggml.eos_token_id": 256,
        }
    )
    assert Tokenizer.from_gguf_metadata(plain, "m.gguf").decode([ALPHABET.index("h")]) == "h"


def test_byte_level_vocabulary_labelled_sentencepiece_is_refused() -> None:
    """tokenizer.ggml.model "llama" on GPT-2-style tokens printed raw "Ġ" where spaces belong."""
    metadata = byte_level(**{"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * 259})
    with pytest.raises(CheckpointError, match=r"model is llama \(SentencePiece\) but its tokens are spelled"):
        Tokenizer.from_gguf_metadata(metadata, "m.gguf")


# --- a written GGUF, through LLM.load and the CLI ---


def generate(path: Path) -> int:
    return main(["generate", "--model", str(path), "-p", "hi", "--max-new-tokens", "2", "--temperature", "0"])


def test_written_gguf_eos_outside_the_vocabulary(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.gguf"  # write_gguf gives a SentencePiece vocabulary BOS 1 and EOS 2
    write_gguf(tiny_hf_model("qwen3"), "qwen3", path, 2, spm=(["<unk>", "<s>"], [0.0, 0.0], [2, 3]))
    expected = f"{path}: tokenizer.ggml.eos_token_id 2 is outside its 2 tokens; {DAMAGED}"
    with pytest.raises(CheckpointError) as error:
        LLM.load(path)
    assert str(error.value) == expected
    assert generate(path) == 2
    assert capsys.readouterr().err == f"lamina: error: {expected}\n"


def test_written_gguf_without_merges(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.gguf"  # write_gguf's default vocabulary: "gpt2" tokens <t0>.. and no merges
    write_gguf(tiny_hf_model("qwen3"), "qwen3", path, 320)
    assert generate(path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lamina: error: {path} has a byte-level BPE tokenizer") and err.count("\n") == 1
