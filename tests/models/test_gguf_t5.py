"""T5 GGUFs (llama.cpp's `t5`: `enc.blk.N.*`, `dec.blk.N.*`) load to transformers' logits and greedy tokens.

The files are written from the tiny T5s of test_t5 (original T5: ReLU `wi`, tied head scaled by
d_model**-0.5; Flan-T5: gated GELU `wi_0`/`wi_1`, own head) with F16 matrices, so transformers runs
the same F16-rounded weights. llama.cpp fixes the bucketing distance at T5's default of 128.
"""

from __future__ import annotations

import pytest
import torch

from lamina.engine.sampling import SamplingParams
from lamina.engine.seq2seq import generate_seq2seq_tokens
from lamina.errors import CheckpointError
from lamina.loading.checkpoint import open_checkpoint
from tests.models.gguf_writer import f16_rounded, write_gguf
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
