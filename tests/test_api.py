"""The Python API: load once, then generate / stream / chat with the documented options."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM
from lamina.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM.load(tiny_models["llama"][1], device="cpu")


def test_model_returns_logits_batch_seq_vocab(llm):
    ids = torch.randint(0, llm.config.vocab_size, (2, 7))
    assert llm.model(ids).shape == (2, ids.shape[1], llm.config.vocab_size)


def test_stream_pieces_join_to_generate(llm):
    options = {"max_new_tokens": 12, "temperature": 0}
    pieces = list(llm.stream("The", **options))
    assert "".join(pieces) == llm.generate("The", **options)
    assert llm.last_stats.new_tokens == 12 and llm.last_stats.prompt_tokens == len(
        llm.tokenizer.encode("The")
    )


def test_seed_makes_sampling_reproducible(llm):
    options = {"max_new_tokens": 16, "temperature": 1.0, "seed": 123}
    assert llm.generate("The", **options) == llm.generate("The", **options)
    others = {llm.generate("The", max_new_tokens=16, temperature=1.0, seed=s) for s in range(4)}
    assert len(others) > 1


def test_stop_string_cuts_output(llm):
    full = llm.generate("The", max_new_tokens=20, temperature=0)
    stop = full[3:6]
    assert stop and stop in full
    cut = llm.generate("The", max_new_tokens=20, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_generation_stops_at_eos(llm, monkeypatch):
    full_ids = llm.tokenizer.encode(
        llm.generate("The", max_new_tokens=10, temperature=0), add_special_tokens=False
    )
    llm_stop = LLM(llm.model, llm.tokenizer, llm.config, llm.source)
    llm_stop.stop_ids = frozenset({full_ids[2]})
    out = llm_stop.generate("The", max_new_tokens=10, temperature=0)
    assert llm_stop.last_stats.new_tokens <= 3 and len(out) < len(
        llm.generate("The", max_new_tokens=10, temperature=0)
    )


def test_chat_uses_template_without_extra_bos(llm):
    messages = [{"role": "user", "content": "hi"}]
    prompt = llm.chat_prompt(messages)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.chat(messages, max_new_tokens=5, temperature=0) == llm.generate(
        prompt, max_new_tokens=5, temperature=0, add_special_tokens=False
    )


def test_prompt_longer_than_context_is_rejected(llm):
    with pytest.raises(InvalidArgumentError, match="context window is 256"):
        llm.generate("word " * 300, max_new_tokens=4)


def test_max_new_tokens_clamped_to_context(llm):
    prompt = "word " * 60
    n = len(llm.tokenizer.encode(prompt))
    assert 100 < n < 250
    llm.generate(prompt, max_new_tokens=1000, temperature=0)
    assert llm.last_stats.new_tokens <= 256 - n


def test_a_run_cut_short_by_the_context_window_says_so(tiny_llama_dir):
    llm = LLM.load(tiny_llama_dir, device="cpu")
    llm.stop_ids = set()  # no end-of-sequence token: only the context window ends the run
    prompt = "word " * 60
    llm.generate(prompt, max_new_tokens=1000, temperature=0)
    assert llm.last_stats.new_tokens == 256 - len(llm.tokenizer.encode(prompt))
    assert llm.last_stats.summary().endswith("; stopped at the model's context window (256 tokens)")
    llm.generate(prompt, max_new_tokens=5, temperature=0)
    assert "context window" not in llm.last_stats.summary()


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        (None, {}, "the prompt must be a str, got NoneType"),
        (["hi"], {}, "the prompt must be a str, got list"),
        (
            "hi \udcff there",
            {},
            r"not valid UTF-8 \(undecodable bytes at character 3\)",
        ),  # invalid bytes, surrogate-escaped
        ("hi", {"max_new_tokens": "4"}, "max new tokens must be an integer >= 1, got '4'"),
        ("hi", {"max_new_tokens": 2.5}, "max new tokens must be an integer >= 1, got 2.5"),
        ("hi", {"seed": 10**30}, "seed must be an integer"),
        ("hi", {"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ("hi", {"top_k": 1.5}, r"top-k must be an integer \(0 = no limit\), got 1.5"),
        ("hi", {"stop": 5}, "stop must be a str or a list of str, got 5"),
        ("hi", {"stop": [None]}, r"stop must be a str or a list of str, got \[None\]"),
    ],
)
def test_bad_requests_are_invalid_argument_errors(llm, prompt, options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        llm.generate(prompt, **options)


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((5,), {}, "a model path must be a str or a Path, got int"),
        ((), {"device": ["cpu"]}, r"device must be a str such as 'cpu' or 'cuda:0', got \['cpu'\]"),
        ((), {"dtype": torch.int8}, "dtype torch.int8 cannot be used here"),  # failed later, in attention
        ((), {"quantize": "int4", "group_size": 128.0}, "group size must be an integer, got 128.0"),
        ((), {"draft": "default", "speculative_k": "4"}, "speculative k must be an integer"),
        ((), {"fuse": "no"}, "fuse must be True or False, got 'no'"),  # a truthy string
        ((), {"offload_dir": 5}, "offload_dir must be a path, got int"),
    ],
)
def test_bad_load_arguments_are_invalid_argument_errors(args, options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        LLM.load(*args, **options)


def test_missing_native_kernels_are_warned_about(tiny_llama_dir, monkeypatch):
    from lamina.kernels import native

    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "cpu_supported", lambda: True)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C compiler (cc, gcc or clang) found")
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    with pytest.warns(UserWarning, match=r"native CPU kernels are unavailable \(no C compiler"):
        LLM.load(tiny_llama_dir, device="cpu")


def test_model_path_problems_are_invalid_argument_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(InvalidArgumentError, match="the model path is empty"):
        LLM.load("")
    with pytest.raises(InvalidArgumentError, match="add a max memory budget"):
        LLM.load(tiny_llama_dir, offload_dir=tmp_path)


def test_nan_logits_are_an_error_not_empty_text(tiny_llama_dir):
    """Damaged weights (a flipped byte, a NaN RoPE base) make NaN logits; sampling them printed empty
    or garbage text with a zero exit status."""
    from lamina.engine.perplexity import perplexity
    from lamina.errors import CheckpointError

    llm = LLM.load(tiny_llama_dir, device="cpu")
    llm.model.model.norm.weight.data[3] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite logits: its weights or config are damaged"):
        llm.generate("The cat", max_new_tokens=4, temperature=0)
    with pytest.raises(CheckpointError, match="NaN or infinite logits"):
        perplexity(llm.model, llm.tokenizer.encode("The cat sat on the mat"), context=8, stride=4)


def test_bfloat16_load_runs_close_to_float32(tiny_models):
    directory = tiny_models["llama"][1]
    ids = torch.tensor([LLM.load(directory).tokenizer.encode("The quick brown fox")])
    reference = LLM.load(directory, dtype="float32").model(ids)
    bf16 = LLM.load(directory, dtype="bfloat16")
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.model(ids).float(), reference, atol=0.1, rtol=0.05)


def test_unknown_dtype_is_rejected(tiny_llama_dir):
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        LLM.load(tiny_llama_dir, dtype="float8")
