"""The bundled SmolLM2-135M-Instruct GGUF: Lamina against transformers' own GGUF loading of the file."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.engine.generate import generate_tokens
from lamina.engine.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
TOKENIZER_TEXTS = [
    "Hello, my name is",
    "plain ASCII with punctuation: a-b, c.d; e!",
    "digits 0 12 345 6789 3.14159 1,000,000",
    "  two leading spaces, \ttabs\t and   runs   of spaces\n\n\nnewlines  ",
    "emoji 🤗🚀👩‍👩‍👧 mixed in",
    "中文测试，日本語のテキスト、한국어",
    "accented: café naïve résumé Ångström façade",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
]


@pytest.fixture(scope="module")
def reference(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": default_gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(default_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM.load(default_gguf, device="cpu", quantize="none")  # float, as transformers dequantizes it


def test_logits_match_transformers_gguf_loading(llm, reference):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model(ids).logits
            actual = llm.model(ids)
        assert (actual - expected).abs().max().item() < 1e-3, prompt
        assert torch.equal(actual.argmax(-1), expected.argmax(-1)), prompt


def test_greedy_32_tokens_match_transformers(llm, reference):
    model, tokenizer = reference
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None)
        actual = list(generate_tokens(llm.model, ids[0].tolist(), 32, SamplingParams(temperature=0)))
        assert actual == expected[0, ids.shape[1] :].tolist(), prompt


def test_tokenizer_ids_match_transformers(llm, reference):
    _, tokenizer = reference
    for text in TOKENIZER_TEXTS:
        assert llm.tokenizer.encode(text) == tokenizer(text).input_ids, text
        assert llm.tokenizer.decode(llm.tokenizer.encode(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(llm, reference):
    _, tokenizer = reference
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars."},
        {"role": "user", "content": "Another?"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.chat_prompt(messages) == expected


def test_generate_and_chat_give_sensible_text(llm):
    assert "Paris" in llm.generate("The capital of France is", max_new_tokens=8, temperature=0)
    reply = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24, temperature=0
    )
    assert "Paris" in reply
    assert llm.last_stats.prompt_tokens > 10 and llm.last_stats.new_tokens >= 1
