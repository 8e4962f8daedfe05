"""SentencePiece-style GGUF vocabularies as `tokenizers` models: BPE (`tokenizer.ggml.model == "llama"`)
and T5's Unigram (`"t5"`, see `unigram_from_gguf`).

llama.cpp stores a SentencePiece BPE vocabulary as tokens with scores (and usually no merges).
This rebuilds what transformers' GGUF conversion builds from the same metadata, so both give the
same ids: BPE with byte fallback, merges recovered from the scores, and the text handling of the
tokenizer class transformers picks for the file's architecture:
- default (Llama, Mistral, ...): `Metaspace` that prepends "▁" to the first word only;
- phi3: a normalizer that prepends "▁" and turns every space into "▁";
- gemma/gemma2/gemma3: spaces to "▁", split after each; merges ordered by position in the file,
  and tokens made of several spaces respelled with "▁" (Gemma files store real spaces there).
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPACE = "\u2581"  # "▁", SentencePiece's visible space
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SENTINELS = 100  # T5's <extra_id_0> .. <extra_id_99>
PLACEHOLDER = re.compile(r"^\[PAD\d+\]$")  # llama.cpp's name for ids past the SentencePiece model


def sentencepiece_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """The BPE tokenizer a `llama`-type GGUF vocabulary describes (special tokens not yet added)."""
    arch = metadata.get("general.architecture")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    if arch in GEMMA_ARCHITECTURES:
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}  # Gemma's merge order is file order
    else:
        scores = dict(zip(tokens, metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens), strict=True))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = metadata.get("tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else merges_from_scores(vocab, scores)
    if arch in GEMMA_ARCHITECTURES:
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tokenizer = Tokenizer(
            models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token=unk, byte_fallback=True)
        )
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        return tokenizer
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    if arch == "phi3":
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="first", split=False
        )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return tokenizer


def unigram_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """The Unigram tokenizer a `t5`-type GGUF vocabulary describes, as transformers' conversion builds it.

    That is T5Tokenizer's shape: words split on whitespace, each prefixed with "▁", no byte
    fallback, EOS appended to every text, and the pad/EOS/unknown tokens and sentinels special.
    Like transformers it does not apply the file's precompiled charsmap (llama.cpp does: text that
    NFKC-style normalization changes, such as full-width letters, can tokenize differently there).
    """
    tokens = sentinel_names(metadata["tokenizer.ggml.tokens"])
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 2)  # T5's id, which transformers assumes
    tokenizer = Tokenizer(models.Unigram(list(zip(tokens, scores, strict=True)), unk_id=unk_id))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    ids = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("padding", "eos")] + [unk_id]
    special = [tokens[i] for i in ids if i is not None]
    special += [t for t in tokens if t.startswith("<extra_id_")]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    if eos_id is not None and metadata.get("tokenizer.ggml.add_eos_token", True):
        eos = tokens[eos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
        )
    return tokenizer


def sentinel_names(tokens: list[str]) -> list[str]:
    """`tokens` with the first 100 `[PADn]` placeholders named `<extra_id_99>` .. `<extra_id_0>`.

    T5 marks each blank in a prompt with a sentinel, highest id first; llama.cpp's converter writes
    the ids past the SentencePiece model, where T5 keeps its sentinels, as placeholders.
    """
    tokens = list(tokens)
    placeholders = [i for i, t in enumerate(tokens) if PLACEHOLDER.match(t)][:SENTINELS]
    for offset, index in enumerate(placeholders):
        tokens[index] = f"<extra_id_{SENTINELS - 1 - offset}>"
    return tokens


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a scored vocabulary implies: every split of a token into two tokens, best score first.

    The same order as transformers' `generate_merges` (ties: shorter left piece, then shorter
    right piece, then vocabulary ids), so the merged ids agree.
    """
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
