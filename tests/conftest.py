"""Shared fixtures: tiny random HF checkpoints made by transformers, and the bundled real model.

Tiny models are built with `AutoModelForCausalLM.from_config` from configs shaped like real ones
(same flags, tiny sizes) and saved with `save_pretrained`, so Lamina reads them through its real
loading code. A small byte-level BPE tokenizer is trained on CPython's docs and saved beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lamina.kernels import native

VOCAB = 320
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=8, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(max_position_embeddings=256)),
}


def tiny_hf_model(family: str, seed: int = 0):
    """A random transformers model of `family` with tiny sizes, in float32 eval mode."""
    import transformers

    class_name, extra = TINY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=1,
        **extra,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE with ChatML special tokens, trained on CPython's docs, as tokenizer.json."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(topics.values())[:50], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML})
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """family -> (transformers model, its saved directory with a tokenizer)."""
    made = {}
    for family in TINY_CONFIGS:
        model = tiny_hf_model(family)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        save_tiny_tokenizer(directory)
        made[family] = (model, directory)
    return made


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models) -> Path:
    return tiny_models["llama"][1]


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from lamina.default_model import default_model_path

    return default_model_path()  # `make test` installs it; a missing model is a setup error here


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI tests set torch's thread count (`--threads`, or the idle cores); don't leak it to other tests."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def native_lib():
    """The built kernel library; tests that exercise it skip only on CPUs that run no build of it
    (neither AVX-512 VNNI nor AVX2)."""
    if not native.cpu_supported():
        pytest.skip("this CPU runs no build of the kernels (neither AVX-512 VNNI nor AVX2)")
    lib = native.library()
    assert lib is not None, f"the native kernels failed to build here: {native.unavailable_reason()}"
    return lib
