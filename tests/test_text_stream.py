"""Streaming text: whole characters only, stop strings never partly shown."""

from __future__ import annotations

from lamina.engine.text_stream import IncrementalDetokenizer, StopStrings
from lamina.loading.tokenizer import Tokenizer


def _stream(tokenizer, ids):
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids]
    return [*pieces, detokenizer.flush()]


def test_multibyte_characters_are_never_split(tiny_llama_dir):
    tokenizer = Tokenizer.from_hf_dir(tiny_llama_dir)
    text = "naïve 🤗 emoji, 中文 and Ångström"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and CJK are several byte tokens each
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_split_across_pieces_is_never_shown():
    stops = StopStrings(["<END>", "\n\n"])
    shown = [stops.feed(p) for p in ["Hello <", "E", "ND> ignored"]]
    assert "".join(shown) == "Hello " and stops.stopped
    assert stops.feed("more") == "" and stops.flush() == ""


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    stops = StopStrings(["<END>"])
    assert stops.feed("a <E") == "a "
    assert stops.feed("xit") == "<Exit"
    assert stops.flush() == "" and not stops.stopped
