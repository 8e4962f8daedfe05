"""T5 against transformers: original T5 (ReLU, scaled tied head) and T5 v1.1 / Flan-T5 (gated GELU).

The encoder runs once and the decoder decodes with a KV cache; both must give transformers' logits
and greedy tokens. Prompts of 12 and 20 decoder steps reach T5's logarithmic position buckets, and
a max distance of 20 clamps the longest ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina.cli import main
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams
from lamina.engine.seq2seq import generate_seq2seq_tokens
from tests.conftest import save_tiny_tokenizer
from tests.models.test_parity import load_lamina
from tests.models.tiny import VOCAB

T5_CONFIGS = {
    "t5": dict(feed_forward_proj="relu"),
    "flan_t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def tiny_t5(variant: str, **overrides):
    import transformers

    values = dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        initializer_factor=1.0, **T5_CONFIGS[variant],
    )  # fmt: skip
    config = transformers.T5Config(**{**values, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(T5_CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = tiny_t5(request.param)
    reference.save_pretrained(directory)
    return reference, load_lamina(directory), directory


PROMPT = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))


def test_logits_match_transformers(pair):
    reference, model, _ = pair
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids, decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(model(ids, decoder_ids), expected)


def test_greedy_generation_matches_transformers_cached_and_uncached(pair):
    reference, model, _ = pair
    with torch.no_grad():
        expected = reference.generate(PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, 1:]
        decoder_ids = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(20):
            decoder_ids = torch.cat([decoder_ids, model(PROMPT, decoder_ids)[:, -1:].argmax(-1)], dim=1)
    cached = list(generate_seq2seq_tokens(model, PROMPT[0].tolist(), 20, SamplingParams(temperature=0)))
    assert cached == expected.tolist()
    assert decoder_ids[0, 1:].tolist() == expected.tolist()


def test_chunked_cached_decode_equals_uncached(pair):
    _, model, _ = pair
    decoder_ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        memory = model.cross_attention_memory(model.encode(PROMPT))
        full = model.decode(decoder_ids, memory)
        cache = KVCache.for_model(model, batch=1, max_len=20, dtype=torch.float32)
        pieces = [model.decode(decoder_ids[:, :7], memory, cache, 0)]
        pieces += [model.decode(decoder_ids[:, i : i + 1], memory, cache, i) for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_hub_style_untied_config_uses_its_own_head(tmp_path):
    """Flan-T5 on the Hub: `tie_word_embeddings: false`, no scaling flag, a separate lm_head."""
    reference = tiny_t5("flan_t5")
    reference.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["tie_word_embeddings"] = False
    del config["scale_decoder_outputs"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    head = torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(9))
    save_file({**tensors, "lm_head.weight": head}, tmp_path / "model.safetensors")
    model = load_lamina(tmp_path)
    decoder_ids = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        hidden = reference(input_ids=PROMPT, decoder_input_ids=decoder_ids, output_hidden_states=True)
        torch.testing.assert_close(model(PROMPT, decoder_ids), hidden.decoder_hidden_states[-1] @ head.T)


def test_cli_generate_runs_the_encoder_decoder(tmp_path, capsys):
    tiny_t5("flan_t5").save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "-p", "Translate this", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "new tokens: 4" in capsys.readouterr().err
