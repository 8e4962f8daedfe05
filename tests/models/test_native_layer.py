"""The native Llama decoder layer against the module path it replaces for decode steps."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lamina.api import LLM
from lamina.engine.fusion import attach_native, fuse_projections
from lamina.engine.generate import prefill
from lamina.engine.kv_cache import KVCache
from lamina.models.llama import LlamaConfig, LlamaForCausalLM
from lamina.models.native_layer import attach_native_layers
from lamina.quant.apply import quantize_model, set_submodule
from lamina.quant.blockq import blockq_linear_from_gguf
from lamina.quant.hub_formats import ReorderedInputLinear
from lamina.quant.llm_int8 import LLMInt8Linear
from tests.quant.conftest import TINY as QUANT_TINY

TINY = {
    **QUANT_TINY,
    "head_dim": 16,
    "max_position_embeddings": 512,
}  # head_dim: the kernels take multiples of 16


@pytest.fixture(autouse=True)
def _needs_kernels(native_lib):
    return native_lib


def blocks_model(sliding_window: int | None = None, attention_type: str = "Q8_0") -> LlamaForCausalLM:
    """A tiny random Llama whose linears are GGUF blocks (attention in `attention_type`, MLP in Q4_1, the
    head in Q8_0, as in the bundled model)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, sliding_window=sliding_window)).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            ggml_type = attention_type if ".self_attn." in name else "Q8_0" if name == "lm_head" else "Q4_1"
            data = quants.quantize(module.weight.numpy(), GGMLQuantizationType[ggml_type])
            set_submodule(model, name, blockq_linear_from_gguf(data, ggml_type, tuple(module.weight.shape)))
    fuse_projections(model)
    assert attach_native_layers(model) == 2
    return model


def decode(model: LlamaForCausalLM, prompt: torch.Tensor, steps: list[list[int]], native_layers: bool):
    """Prefill `prompt`, then feed each step's tokens; the logits of each step and the cache."""
    saved = [layer.native for layer in model.decoder_layers()]
    if not native_layers:
        for layer in model.decoder_layers():
            layer.native = None
    try:
        cache = KVCache.for_model(model, batch=prompt.shape[0], max_len=64, dtype=torch.float32)
        prefill(model, prompt, cache)
        position, logits = prompt.shape[1], []
        for tokens in steps:
            ids = torch.tensor(tokens).expand(prompt.shape[0], -1)
            logits.append(model(ids, cache=cache, start_pos=position))
            position += len(tokens)
        return logits, cache
    finally:
        for layer, saved_native in zip(model.decoder_layers(), saved, strict=True):
            layer.native = saved_native


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("batch", [1, 2])
def test_native_layers_compute_what_the_modules_compute(window, batch) -> None:
    model = blocks_model(sliding_window=window)
    prompt = torch.randint(0, 256, (batch, 9), generator=torch.Generator().manual_seed(1))
    steps = [[5], [17, 200, 3], [42]]
    with torch.inference_mode():
        got, got_cache = decode(model, prompt, steps, native_layers=True)
        want, want_cache = decode(model, prompt, steps, native_layers=False)
    # The paths round differently in norms, RoPE and SiLU (~1e-7), and the block kernel's int8 codes
    # turn such differences into ~5e-5 of a layer's outputs (as a 1-ulp change of the input does).
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 5e-4 * b.abs().max()
    for a, b in zip(got_cache.tensors(), want_cache.tensors(), strict=True):
        assert (a - b).abs().max() <= 5e-4 * b.abs().max()


def llm_int8_model(threshold: float) -> LlamaForCausalLM:
    """A tiny random Llama in LLM.int8 on native layers; its norms make input features 3 and 40 of
    every attention and MLP input outliers (|x| >= 6) at the default threshold."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    for layer in model.decoder_layers():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[[3, 40]] = 30.0
    quantize_model(model, "llm.int8")
    for module in model.modules():
        if isinstance(module, LLMInt8Linear):
            module.threshold = threshold
    fuse_projections(model)
    assert attach_native(model)[1] == 2
    return model


def test_llm_int8_native_layers_split_off_the_outlier_columns() -> None:
    """The native layer runs LLM.int8's outlier split as the modules do: the same logits to float
    rounding, while a model without the split (threshold out of reach) is far from them."""
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    steps = [[5], [17, 200, 3], [42]]
    model, unsplit = llm_int8_model(6.0), llm_int8_model(1e9)
    with torch.inference_mode():
        got, _ = decode(model, prompt, steps, native_layers=True)
        want, _ = decode(model, prompt, steps, native_layers=False)
        far, _ = decode(unsplit, prompt, steps, native_layers=True)
    for a, b, c in zip(got, want, far, strict=True):
        assert (a - b).abs().max() <= 5e-4 * b.abs().max()
        assert (c - b).abs().max() >= 1e-2 * b.abs().max()


def test_several_rows_equal_their_steps_one_by_one_bit_for_bit() -> None:
    """A speculative verify pass (several rows) must give exactly the decode steps' logits."""
    model = blocks_model()
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        (together,), _ = decode(model, prompt, [[7, 8, 9, 10]], native_layers=True)
        one_by_one, _ = decode(model, prompt, [[7], [8], [9], [10]], native_layers=True)
    assert torch.equal(together, torch.cat(one_by_one, dim=1))


def test_prompts_and_compiled_positions_take_the_module_path(monkeypatch) -> None:
    model = blocks_model()
    calls = []
    layer = model.decoder_layers()[0]
    run = layer.native.run
    monkeypatch.setattr(layer.native, "run", lambda *a: calls.append(a[0].shape[1]) or run(*a))
    cache = KVCache.for_model(model, batch=1, max_len=64, dtype=torch.float32)
    with torch.inference_mode():
        model(
            torch.zeros(1, 20, dtype=torch.long), cache=cache, start_pos=0
        )  # 20 rows > 16: declined inside run
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache, start_pos=torch.tensor([20]))  # never offered
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache, start_pos=21)
    assert calls == [20, 1]


@pytest.mark.parametrize("variant", [{"attention_bias": True}, {"qk_norm": True}, {"hidden_act": "gelu"}])
def test_layers_with_unsupported_parts_are_not_attached(variant) -> None:
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **variant})).eval()
    fuse_projections(model)
    assert attach_native_layers(model) == 0


@pytest.mark.parametrize("fuse", [True, False])
def test_float32_layers_fused_or_not_compute_what_the_modules_compute(fuse: bool) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    if fuse:
        fuse_projections(model)
    assert attach_native_layers(model) == 2
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, _ = decode(model, prompt, [[5], [6, 7, 8]], native_layers=True)
        want, _ = decode(model, prompt, [[5], [6, 7, 8]], native_layers=False)
    for a, b in zip(got, want, strict=True):  # no int8 codes on this path: float32 rounding only
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_the_default_model_decodes_on_native_layers(default_gguf) -> None:
    llm = LLM.load(default_gguf, device="cpu")
    assert all(layer.native is not None for layer in llm.model.decoder_layers())
    prompt = torch.tensor([llm.tokenizer.encode("The history of the city of Rome begins")])
    with torch.inference_mode():
        got, _ = decode(llm.model, prompt, [[1000], [2000, 3000, 4000], [42]], native_layers=True)
        want, _ = decode(llm.model, prompt, [[1000], [2000, 3000, 4000], [42]], native_layers=False)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 0.05  # logits up to ~20; the paths round differently
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_compile_is_skipped_for_a_model_on_native_layers(default_gguf) -> None:
    with pytest.warns(UserWarning, match="compiling is skipped: this model decodes on native layers"):
        llm = LLM.load(default_gguf, device="cpu", compile=True)
    assert llm.decoder is None


def test_rebound_weights_are_followed_and_replaced_projections_declined() -> None:
    """Streaming rebinds weights every step (same modules, new memory); replacing a module is different."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    attach_native_layers(model)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    down = model.decoder_layers()[1].mlp.down_proj
    with torch.inference_mode():
        decode(model, prompt, [[5]], native_layers=True)  # the struct now points at the weights
        down.weight.data = down.weight.data * 2  # new memory, as a streaming hook binds it
        got, _ = decode(model, prompt, [[5]], native_layers=True)
        want, _ = decode(model, prompt, [[5]], native_layers=False)
        assert (got[0] - want[0]).abs().max() <= 1e-5 * want[0].abs().max()
        layer = model.decoder_layers()[0]
        layer.mlp.down_proj = torch.nn.Linear(128, 64, bias=False)
        cache = KVCache.for_model(model, batch=1, max_len=16, dtype=torch.float32)
        _, rope = model.embed(prompt[:, :1], 0)
        assert layer.native.run(torch.randn(1, 1, 64), rope, cache, 0) is None


def act_order_model() -> LlamaForCausalLM:
    """A tiny random Llama whose projections are Q4_0 blocks over inputs in a random order each, as a
    GPTQ act-order checkpoint loads (`ReorderedInputLinear`), on native layers."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(2)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            order = torch.randperm(module.in_features, generator=generator)
            data = quants.quantize(module.weight[:, order].contiguous().numpy(), GGMLQuantizationType.Q4_0)
            inner = blockq_linear_from_gguf(data, "Q4_0", tuple(module.weight.shape))
            set_submodule(model, name, ReorderedInputLinear(inner, order))
    fuse_projections(model)
    assert attach_native(model)[1] == 2
    return model


def test_act_order_layers_gather_their_inputs_on_native_layers() -> None:
    model = act_order_model()
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = [[5], [17, 200, 3], [42]]
    with torch.inference_mode():
        got, _ = decode(model, prompt, steps, native_layers=True)
        want, _ = decode(model, prompt, steps, native_layers=False)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 5e-4 * b.abs().max()
