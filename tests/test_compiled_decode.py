"""The fast decode paths give what the plain eager path gives: fused projections, the static-shape
step (a tensor position over the whole cache) and the torch.compile'd step."""

from __future__ import annotations

import pytest
import torch

from lamina.api import LLM
from lamina.engine.compiled import CompiledDecoder, bucket_length
from lamina.engine.fusion import fuse_projections
from lamina.engine.generate import generate_tokens
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams
from lamina.models.layers import _causal_mask
from lamina.models.sdpa import decode_attention, sdpa

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [3, 4, 5, 6, 7]


def _unfused(directory):
    return LLM.load(directory, device="cpu", compile=False).model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fused_projections_match_separate_ones(tiny_models, family):
    model = LLM.load(tiny_models[family][1], device="cpu", compile=False).model  # load fuses
    assert model.model.layers[0].self_attn.qkv_proj is not None
    expected = tiny_models[family][0]
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected(ids).logits)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_position_step_equals_int_position(tiny_models, family):
    model = _unfused(tiny_models[family][1])
    ids = torch.randint(0, 320, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dynamic = KVCache.for_model(model, batch=1, max_len=14, dtype=torch.float32)
        static = KVCache.for_model(model, batch=1, max_len=32, dtype=torch.float32)
        model(ids[:, :10], dynamic, 0)
        model(ids[:, :10], static, 0)
        for i in range(10, 14):  # mistral's window is 8: these steps slide past it
            expected = model(ids[:, i : i + 1], dynamic, i)
            actual = model(ids[:, i : i + 1], static, torch.tensor([i]))
            torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_only_the_filled_prefix(window, dtype):
    """The compiled step's attention op equals the masked form over the whole static cache."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 1, 16, generator=gen).to(dtype)  # 6 query heads sharing 3 KV heads
    k, v = (torch.randn(2, 3, 32, 16, generator=gen).to(dtype) for _ in range(2))
    k[:, :, 21:], v[:, :, 21:] = 1e4, float("nan")  # past the position: must not be read
    position = torch.tensor([20])
    mask = _causal_mask(position, 1, 32, window or None, q.device)  # [1, 32]
    expected = sdpa(q.float(), k.float().nan_to_num(0), v.float().nan_to_num(0), mask=mask)
    tolerance = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}  # bf16 rounding
    torch.testing.assert_close(decode_attention(q, k, v, position, window).float(), expected, **tolerance)


def test_fusion_is_idempotent_and_skips_fused(tiny_llama_dir):
    model = _unfused(tiny_llama_dir)
    assert fuse_projections(model) == 0  # LLM.load already fused attention and MLP of every layer


def test_bucket_length_rounds_up_within_context():
    assert bucket_length(1, 8192) == 256
    assert bucket_length(257, 8192) == 512
    assert bucket_length(300, 300) == 300


def test_compiled_and_eager_give_identical_greedy_tokens(tiny_llama_dir):
    """Compiles a 2-layer model (tens of seconds on a busy 2-core machine): the one compile test in `make test`."""
    model = _unfused(tiny_llama_dir)
    eager = list(generate_tokens(model, PROMPT, 24, GREEDY))
    decoder = CompiledDecoder(model, verbose=False)
    compiled = list(generate_tokens(model, PROMPT, 24, GREEDY, decoder=decoder))
    assert compiled == eager
    # a second generation of another length reuses the compiled step and the bucketed cache
    assert decoder.compile_s > 0
    again = list(generate_tokens(model, PROMPT[:3], 24, GREEDY, decoder=decoder))
    assert again == list(generate_tokens(model, PROMPT[:3], 24, GREEDY))
    assert decoder.compile_s == 0.0


def test_cpu_compiles_one_graph_for_every_layer(tiny_llama_dir):
    """On CPU one decoder layer is compiled and reused: a graph per layer would mean the layer index
    (or a layer's identity) got baked in, and warm-up would grow with depth."""
    model = _unfused(tiny_llama_dir)
    assert len(model.decoder_layers()) > 1
    decoder = CompiledDecoder(model, verbose=False)
    assert decoder.per_layer
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decoder.cache(batch=1, length=8, dtype=torch.float32)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_step_logits_close_to_eager(tiny_llama_dir):
    model = _unfused(tiny_llama_dir)
    decoder = CompiledDecoder(model, verbose=False)
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(ids)[:, -1]
        cache = decoder.cache(batch=1, length=8, dtype=torch.float32)
        model(ids[:, :7], cache, 0)
        actual = decoder.step(ids[:, 7:8].clone(), torch.tensor([7]), cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager(tiny_llama_dir):
    model = LLM.load(tiny_llama_dir, device="cuda", compile=False).model
    eager = list(generate_tokens(model, PROMPT, 24, GREEDY))
    compiled = list(generate_tokens(model, PROMPT, 24, GREEDY, decoder=CompiledDecoder(model, verbose=False)))
    assert compiled == eager


def test_compile_failure_falls_back_to_eager_static_step(tiny_llama_dir, monkeypatch):
    model = _unfused(tiny_llama_dir)
    decoder = CompiledDecoder(model, verbose=False)

    def broken(*args):
        raise RuntimeError("backend cannot lower this op")

    monkeypatch.setattr(decoder, "_compiled", broken)
    tokens = list(generate_tokens(model, PROMPT, 12, GREEDY, decoder=decoder))
    assert decoder.failed
    assert tokens == list(generate_tokens(model, PROMPT, 12, GREEDY))


def test_real_model_compiled_greedy_equals_eager(default_gguf):
    """The default model: 64 greedy tokens through the compiled step equal the eager ones (~15 s to
    compile one layer in a fresh inductor cache)."""
    llm = LLM.load(default_gguf, device="cpu", compile=False)
    prompt = llm.tokenizer.encode("The history of the city of")
    eager = list(generate_tokens(llm.model, prompt, 64, GREEDY))
    compiled = list(generate_tokens(llm.model, prompt, 64, GREEDY, decoder=CompiledDecoder(llm.model)))
    assert compiled == eager


def test_a_model_with_layers_that_cannot_be_traced_is_not_compiled(tiny_llama_dir):
    """LLM.int8's outlier columns depend on the data: compiling broke the graph after a minute of
    trying (seen on an H200), so such a model decodes eagerly from the start."""
    from lamina.engine.compiled import should_compile
    from lamina.quant.apply import quantize_model

    model = _unfused(tiny_llama_dir)
    assert should_compile(model, torch.device("cuda"), None)
    quantize_model(model, "llm.int8")
    assert not should_compile(model, torch.device("cuda"), None)
    with pytest.warns(UserWarning, match="quantized layers cannot be traced"):
        assert not should_compile(model, torch.device("cpu"), True)
