"""SentencePiece-style GGUF vocabularies (`tokenizer.ggml.model == "llama"`) as `tokenizers` BPE models.

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

from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"  # "▁", SentencePiece's visible space
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


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
