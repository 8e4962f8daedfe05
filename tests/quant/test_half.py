"""16-bit weights with float32 arithmetic (`--quantize bf16|fp16`): the kernel, the layer, the native layer."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from lamina.api import LLM
from lamina.engine.fusion import attach_native, fuse_projections
from lamina.kernels import native
from lamina.model_info import describe
from lamina.models.llama import LlamaConfig, LlamaForCausalLM
from lamina.quant.apply import quantize_model
from lamina.quant.checkpoint import save_quantized
from lamina.quant.half import HALF_DTYPES, HalfEmbedding, HalfLinear
from tests.conftest import save_tiny_tokenizer, tiny_hf_model
from tests.models.gguf_writer import write_gguf
from tests.models.test_native_layer import TINY, decode
from tests.models.test_parity import load_lamina
from tests.models.tiny import TINY as TINY_FAMILIES
from tests.models.tiny import VOCAB
from tests.models.tiny import tiny_hf_model as tiny_family_model
from tests.quant.test_gguf_convert import load_kept

DTYPES = list(HALF_DTYPES.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_a_16_bit_weight_multiplies_exactly_as_its_float32_widening(native_lib, dtype, rows: int) -> None:
    weight = (torch.randn(37, 576) * 0.05).to(dtype)
    x, bias = torch.randn(rows, 576), torch.randn(37)
    got = native.dense_linear(x, weight, bias)
    assert torch.equal(got, native.dense_linear(x, weight.float(), bias))  # the same sums, in the same order
    expected = x.double() @ weight.double().t() + bias.double()
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("method", list(HALF_DTYPES))
def test_the_layer_rounds_once_and_computes_in_float32(native_lib, method: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = HalfLinear.from_float(linear, method=method)
    assert layer.weight16.dtype == HALF_DTYPES[method] and layer.weight_bytes() == 64 * 48 * 2 + 48 * 4
    assert torch.equal(layer.dequantize(), linear.weight.detach().to(HALF_DTYPES[method]).float())
    one, many = torch.randn(1, 64), torch.randn(40, 64)  # the native mat-vec, then F.linear
    for x in (one, many):
        want = nn.functional.linear(x, layer.dequantize(), linear.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(HALF_DTYPES))
def test_export_rebuild_and_concatenate_keep_the_outputs(native_lib, method: str) -> None:
    torch.manual_seed(1)
    parts = [HalfLinear.from_float(nn.Linear(64, n, bias=False), method=method) for n in (16, 32)]
    x = torch.randn(3, 64)
    rebuilt = HalfLinear.from_tensors(64, 16, parts[0].scheme_config(), parts[0].export_tensors())
    assert torch.equal(rebuilt(x), parts[0](x))
    fused = HalfLinear.concatenate(parts)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=1))  # rows are computed alone


@pytest.mark.parametrize("method", list(HALF_DTYPES))
def test_native_decoder_layers_run_16_bit_weights(native_lib, method: str) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    quantize_model(model, method)
    fuse_projections(model)
    assert attach_native(model)[1] == 2  # both layers on the C path, with fused 16-bit projections
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, _ = decode(model, prompt, [[5], [17, 200, 3]], native_layers=True)
        want, _ = decode(model, prompt, [[5], [17, 200, 3]], native_layers=False)
    for a, b in zip(got, want, strict=True):  # the two paths round norms, RoPE and SiLU differently
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize(("dtype", "method"), [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_a_16_bit_checkpoint_stays_16_bit_by_default_and_computes_the_same(
    native_lib, tmp_path, dtype, method
) -> None:
    model = tiny_hf_model("llama").to(dtype)
    model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    kept, widened = LLM.load(tmp_path), LLM.load(tmp_path, quantize="none")
    layers = [m for m in kept.model.modules() if isinstance(m, HalfLinear)]
    assert layers and {layer.method for layer in layers} == {method}
    assert not any(isinstance(m, HalfLinear) for m in widened.model.modules())
    assert sum(kept.memory_footprint().values()) < sum(widened.memory_footprint().values())
    ids = torch.tensor([kept.tokenizer.encode("The quick brown fox jumps")])
    with torch.inference_mode():  # widening is exact, and the kernels multiply a widened weight alike
        assert torch.equal(kept.model(ids), widened.model(ids))
    greedy = {"max_new_tokens": 8, "temperature": 0}
    assert kept.generate("Once upon", **greedy) == widened.generate("Once upon", **greedy)
    # the tied embedding and head: one 16-bit table, all weights at 2 bytes
    embed, head = kept.model.input_embeddings(), kept.model.output_embeddings()
    assert isinstance(embed, HalfEmbedding) and isinstance(head, HalfLinear)
    assert embed.weight16.dtype == dtype and head.weight16.data_ptr() == embed.weight16.data_ptr()
    expected = sum((2 if p.dim() == 2 else 4) * p.numel() for p in model.parameters())  # norms: float32
    assert sum(kept.memory_footprint().values()) == expected == describe(tmp_path).kept_bytes()


def test_an_untied_16_bit_head_stays_16_bit(native_lib, tmp_path) -> None:
    model = tiny_hf_model("qwen2").to(torch.bfloat16)  # qwen2's tiny config: an untied head
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    kept, widened = LLM.load(tmp_path), LLM.load(tmp_path, quantize="none")
    embed, head = kept.model.input_embeddings(), kept.model.output_embeddings()
    assert isinstance(embed, HalfEmbedding) and isinstance(head, HalfLinear)
    assert head.weight16.data_ptr() != embed.weight16.data_ptr()
    assert type(widened.model.output_embeddings()) is not HalfLinear  # "none" widens everything
    assert sum(kept.memory_footprint().values()) == describe(tmp_path).kept_bytes()
    ids = torch.tensor([kept.tokenizer.encode("The quick brown fox jumps")])
    with torch.inference_mode():
        assert torch.equal(kept.model(ids), widened.model(ids))


def test_a_float32_checkpoint_keeps_a_float32_embedding(tiny_llama_dir) -> None:
    llm = LLM.load(tiny_llama_dir)
    assert type(llm.model.input_embeddings()) is nn.Embedding


def test_a_gguf_s_f16_matrices_stay_16_bit_and_compute_the_same(native_lib, tmp_path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    path = write_gguf(transformers.LlamaForCausalLM(config).eval(), "llama", tmp_path / "f16.gguf", VOCAB)
    kept, widened = load_kept(path), load_lamina(path)
    layers = [m for m in kept.modules() if isinstance(m, HalfLinear)]
    assert len(layers) == 2 * 7 + 1  # every projection and the (untied) output head
    assert all(layer.weight16.dtype == torch.float16 for layer in layers)
    assert isinstance(kept.input_embeddings(), HalfEmbedding)  # the F16 token embedding too
    assert kept.input_embeddings().weight16.dtype == torch.float16
    attach_native(kept), attach_native(widened)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():  # rows permuted as llama.cpp stores q/k, values exact
        assert torch.equal(kept(ids), widened(ids))
    footprint = sum(t.numel() * t.element_size() for t in [*kept.parameters(), *kept.buffers()])
    assert describe(path).kept_bytes() == footprint


@pytest.mark.parametrize("family", list(TINY_FAMILIES))  # the decoder-only families
def test_every_family_keeps_a_16_bit_embedding_and_computes_the_same(native_lib, tmp_path, family) -> None:
    """A bfloat16 checkpoint of each decoder-only family: a 16-bit embedding and the logits of the
    widened model (bit for bit but BLOOM's, 1e-6 apart with or without the 16-bit embedding)."""
    tiny_family_model(family).to(torch.bfloat16).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    kept, widened = LLM.load(tmp_path), LLM.load(tmp_path, quantize="none")
    assert isinstance(kept.model.input_embeddings(), HalfEmbedding)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    with torch.inference_mode():
        got, expected = kept.model(ids), widened.model(ids)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("method", ["int4", "int8", "nf4"])
def test_a_16_bit_embedding_stays_16_bit_under_a_method(native_lib, tmp_path, method: str) -> None:
    """A method quantizes the linears and leaves the tied embedding and head alone: 16-bit, computing
    exactly as the float32 table would."""
    tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    kept = LLM.load(tmp_path, quantize=method, fuse=False)
    embed, head = kept.model.input_embeddings(), kept.model.output_embeddings()
    assert isinstance(embed, HalfEmbedding) and isinstance(head, HalfLinear)
    assert head.weight16.data_ptr() == embed.weight16.data_ptr()
    widened = LLM.load(tmp_path, quantize="none", fuse=False)  # the table widened to float32
    quantize_model(widened.model, method)  # the same linears (round-to-nearest is deterministic)
    attach_native(widened.model)  # as LLM.load does after quantizing
    saved = embed.weight16.numel() * 2  # float32's 4 bytes a weight against 2
    assert sum(widened.memory_footprint().values()) - sum(kept.memory_footprint().values()) == saved
    ids = torch.tensor([kept.tokenizer.encode("The quick brown fox jumps")])
    with torch.inference_mode():
        assert torch.equal(kept.model(ids), widened.model(ids))


def test_a_model_with_a_16_bit_embedding_saves_and_reloads(native_lib, tmp_path) -> None:
    """The 16-bit table is saved once as the embedding's weight (the tied head is not saved apart):
    the reloaded model computes the same logits."""
    tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    save_tiny_tokenizer(tmp_path / "src")
    llm = LLM.load(tmp_path / "src", quantize="int8", fuse=False)
    assert isinstance(llm.model.input_embeddings(), HalfEmbedding)
    save_quantized(
        llm.model, tmp_path / "q", "int8", config=json.loads((tmp_path / "src" / "config.json").read_text())
    )
    save_tiny_tokenizer(tmp_path / "q")
    reloaded = LLM.load(tmp_path / "q", fuse=False)
    ids = torch.tensor([llm.tokenizer.encode("The quick brown fox jumps")])
    with torch.inference_mode():
        assert torch.equal(reloaded.model(ids), llm.model(ids))
