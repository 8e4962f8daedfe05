"""Lamina's Llama under a memory cap: same logits and tokens as fully in memory, on every tier mix."""

import pytest
import torch

from lamina.engine.generate import generate_tokens
from lamina.engine.sampling import SamplingParams
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty, load_weights
from lamina.placement import load_and_dispatch

LAYER = (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) * 4  # bytes of one decoder layer of the tiny model
EMBED = 320 * 64 * 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def in_memory(folder):
    with open_checkpoint(folder) as ckpt:
        model, _ = build_empty(ckpt)
        load_weights(model, ckpt, torch.float32, "cpu")
    return model.eval()


def dispatched(folder, cpu_budget, offload_dir, dtype="float32"):
    with open_checkpoint(folder) as ckpt:
        model, _ = build_empty(ckpt)
        load_and_dispatch(model, ckpt, max_memory={"cpu": cpu_budget}, offload_dir=offload_dir, dtype=dtype)
    return model.eval()


@pytest.mark.parametrize(
    ("cpu_budget", "dtype"),
    [
        (10**7, "float32"),  # all resident
        (EMBED + 3 * LAYER, "float32"),  # one layer resident, two streamed in place from the checkpoint
        (2 * LAYER + 100, "float32"),  # every layer and the embedding streamed
        (EMBED // 2 + 3 * LAYER // 2, "bfloat16"),  # cast: streamed from the offload folder
    ],
)
def test_logits_and_cached_generation_match_in_memory(tiny_dir, tmp_path, cpu_budget, dtype):
    reference = in_memory(tiny_dir)
    if dtype == "bfloat16":
        reference = reference.to(torch.bfloat16)
    model = dispatched(tiny_dir, cpu_budget, tmp_path / "off", dtype)
    ids = torch.randint(2, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    greedy = SamplingParams(temperature=0.0)
    expected = list(generate_tokens(reference, [5, 6, 7], 12, greedy))
    assert list(generate_tokens(model, [5, 6, 7], 12, greedy)) == expected
    if cpu_budget < 10**7:
        assert "disk" in model.lamina_plan.device_map.values()
