"""A Hugging Face `tokenizers` tokenizer rebuilt from a GGUF file's metadata.

GGUF stores the vocabulary, merges and token types under `tokenizer.ggml.*`. For byte-level BPE
(`tokenizer.ggml.model == "gpt2"`) this builds the same BPE model, pre-tokenizer split and decoder
that transformers' GGUF conversion builds, so both give the same ids for the same text; for
SentencePiece-style vocabularies (`"llama"` BPE, `"t5"` Unigram) see `gguf_sentencepiece`.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.loading.gguf_sentencepiece import (
    GEMMA_ARCHITECTURES,
    SPACE,
    sentencepiece_from_gguf,
    unigram_from_gguf,
)

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types
DAMAGED = "the file's metadata is damaged, re-download or re-convert it"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values whose text split differs from GPT-2's; others use GPT-2's own regex.
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def tokenizer_from_gguf(metadata: dict[str, Any], source: str = "the GGUF file") -> Tokenizer:
    """The backend tokenizer a GGUF file's metadata describes (special tokens registered).

    The metadata is checked first (`check_gguf_tokenizer`); `source` names the file in its errors.
    """
    check_gguf_tokenizer(metadata, source)
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _with_special_tokens(sentencepiece_from_gguf(metadata), metadata, byte_level=False)
    if kind == "t5":
        return _with_special_tokens(unigram_from_gguf(metadata), metadata, byte_level=False)
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer type {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
            "llama (SentencePiece BPE with scores), t5 (SentencePiece Unigram)"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    tokenizer = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [])
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return _with_special_tokens(tokenizer, metadata, byte_level=True)


def check_gguf_tokenizer(metadata: dict[str, Any], source: str = "the GGUF file") -> None:
    """Raise a `CheckpointError` naming `source` and the key for tokenizer metadata that would fail
    (or silently garble text) when the tokenizer is built: no token list, parallel lists (types,
    scores) of another length, a special-token id the tokenizer looks up that is not a token, or a
    byte-level BPE vocabulary without the merges that make its tokens."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(
            f"{source} has no tokenizer (tokenizer.ggml.tokens); Lamina needs one to read and write text"
        )
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens is not a list of token strings; {DAMAGED}")
    for key in ("token_type", "scores"):
        values = metadata.get(f"tokenizer.ggml.{key}")
        if values is not None and (not isinstance(values, list) or len(values) != len(tokens)):
            count = f"{len(values)} entries" if isinstance(values, list) else repr(values)
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{key} has {count} for {len(tokens)} tokens; {DAMAGED}"
            )
    kind = metadata.get("tokenizer.ggml.model")
    for key in _special_tokens_used(kind, metadata.get("general.architecture")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{key}_token_id is {token_id!r}, not a token id; {DAMAGED}"
            )
        if not 0 <= token_id < len(tokens):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{key}_token_id {token_id} is outside its {len(tokens)} tokens; "
                + DAMAGED
            )
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None and (
        not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges)
    ):
        raise CheckpointError(
            f'{source}: tokenizer.ggml.merges is not a list of "LEFT RIGHT" pairs; {DAMAGED}'
        )
    if kind == "gpt2" and not merges and _has_multi_character_tokens(metadata, tokens):
        raise CheckpointError(
            f"{source} has a byte-level BPE tokenizer (tokenizer.ggml.model gpt2) without its merges "
            "(tokenizer.ggml.merges), so text would split into single bytes the model was not trained on; "
            "re-convert the model with its tokenizer's merges"
        )
    if kind == "llama" and _looks_byte_level(tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is llama (SentencePiece) but its tokens are spelled as "
            "byte-level BPE (Ġ for a space, no ▁), so text would be garbled; the file's metadata is wrong, "
            "re-convert it"
        )


def _looks_byte_level(tokens: list[str]) -> bool:
    """Byte-level BPE spelling (GPT-2's "Ġ" for a space) and none of SentencePiece's "▁"."""
    return any(t.startswith("\u0120") for t in tokens) and not any(SPACE in t for t in tokens)


def _special_tokens_used(kind: Any, arch: Any) -> tuple[str, ...]:
    """The `tokenizer.ggml.{key}_token_id` keys building this kind of tokenizer looks up."""
    if kind == "t5":
        return ("bos", "eos", "unknown", "padding")
    if kind == "llama" and arch in GEMMA_ARCHITECTURES:
        return ("bos", "eos", "unknown")
    return ("bos", "eos")


def _has_multi_character_tokens(metadata: dict[str, Any], tokens: list[str]) -> bool:
    """Whether some ordinary token is longer than one character (only merges can produce it)."""
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    return any(len(t) > 1 and kind == NORMAL for t, kind in zip(tokens, types, strict=True))


def _with_special_tokens(tokenizer: Tokenizer, metadata: dict[str, Any], byte_level: bool) -> Tokenizer:
    """Register control tokens as special and user-defined ones as added; add BOS if the file asks."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == CONTROL and (not byte_level or set(t) <= alphabet)
    ]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == USER_DEFINED
        ]
    )
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", not byte_level)
    if add_bos and metadata.get("tokenizer.ggml.bos_token_id") is not None:
        bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    return tokenizer


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> Tokenizer:
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_chars = _bytes_to_unicode()
    # A token spelled outside the byte alphabet (a raw special token) is re-spelled byte by byte.
    vocab = {
        (t if set(t) <= alphabet else "".join(byte_chars[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
