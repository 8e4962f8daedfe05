"""GPTQ and AWQ checkpoints made by other tools load as stored (`lamina/quant/hub_formats.py`).

The checkpoints are packed by `hub_packers.py`, which follows the reference writers (GPTQModel,
AutoAWQ). The reference model is transformers' with each quantized linear's weight set to s (q - z),
what those tools' own dequantization gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lamina import LLM
from lamina.cli import main as cli_main
from lamina.cli.info import render
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.model_info import describe
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.checkpoint import save_quantized
from lamina.quant.half import HalfLinear
from lamina.quant.hub_formats import ReorderedInputLinear, build_linear, unpack_layer
from lamina.quant.hub_scheme import HubScheme, hub_scheme
from lamina.quant.int4 import Int4Linear
from lamina.quant.int8 import Int8Linear
from tests.quant.hub_packers import PROJECTIONS, dequantized, pack_awq, pack_gptq, quantize, write_quantized


def act_order_g_idx(k: int, group_size: int, seed: int) -> torch.Tensor:
    """A GPTQ act-order g_idx: inputs in a random order, each run of group_size in one group."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // group_size
    return g_idx


def layer_case(method: str, sym: bool, act_order: bool, group_size: int = 32, seed: int = 0, bits: int = 4):
    """(packed tensors, reference weight [N, K], scheme) for a random 64 x 128 layer."""
    torch.manual_seed(seed)
    shift = torch.linspace(-0.3, 0.3, 64 * 4).reshape(64, 4).repeat_interleave(32, dim=1)  # groups off 0
    w = torch.randn(64, 128) * 0.05 + shift  # [N, K]
    q, s, z = quantize(w, group_size, sym, bits)
    g_idx = act_order_g_idx(128, group_size, seed) if act_order else torch.arange(128) // group_size
    if act_order:  # codes of a scattered group were quantized with that group's scale and zero
        w_groups = w[:, g_idx.argsort(stable=True)]
        q, s, z = quantize(w_groups, group_size, sym, bits)
        q = q[:, g_idx.argsort(stable=True).argsort()]
    reference = dequantized(q, s, z, g_idx)
    if method == "awq":
        return pack_awq(q, s, z), reference, HubScheme("awq", "gemm", group_size)
    fmt = "gptq" if method == "gptq-v1" else "gptq_v2"
    packed = pack_gptq(q, s, z, g_idx, v1=fmt == "gptq", bits=bits)
    return packed, reference, HubScheme("gptq", fmt, group_size, sym, bits)


@pytest.mark.parametrize("method", ["gptq-v1", "gptq-v2", "awq"])
@pytest.mark.parametrize("sym", [True, False])
def test_unpacked_values_are_the_tools_dequantization_exactly(method: str, sym: bool) -> None:
    packed, reference, scheme = layer_case(method, sym, act_order=False)
    layer = unpack_layer(scheme, packed, (64, 128), "layer")
    assert torch.equal(layer.dequantize(), reference)
    if not sym:  # the asymmetric zeros reach both ends, so v1's words borrowed somewhere
        assert layer.zeros.min() == 0 and layer.zeros.max() == 15


@pytest.mark.parametrize("method", ["gptq-v1", "gptq-v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_unpacked_8_bit_values_are_the_tools_dequantization_exactly(method: str, sym: bool) -> None:
    packed, reference, scheme = layer_case(method, sym, act_order=False, bits=8)
    assert packed["qweight"].shape == (128 // 4, 64)  # four codes a word
    layer = unpack_layer(scheme, packed, (64, 128), "layer")
    assert layer.bits == 8 and torch.equal(layer.dequantize(), reference)
    if sym:
        assert (layer.zeros == 128).all()
    else:  # groups off zero put the zero points at both ends (v1's words borrowed somewhere)
        assert layer.zeros.min() == 0 and layer.zeros.max() == 255


def test_gptq_v1_zero_of_zero_borrows_and_is_recovered() -> None:
    z = torch.zeros(64, 4, dtype=torch.int32)  # every zero point 0: each v1 nibble borrows
    q = torch.randint(0, 16, (64, 128), dtype=torch.int32)
    s = torch.full((64, 4), 0.01).half().float()
    packed = pack_gptq(q, s, z, torch.arange(128) // 32, v1=True)
    assert (packed["qzeros"] == -0x11111111).all()  # 0 - 0x11111111, wrapped: borrows
    layer = unpack_layer(HubScheme("gptq", "gptq", 32), packed, (64, 128), "layer")
    assert torch.equal(layer.zeros, torch.zeros(64, 4, dtype=torch.uint8))
    packed = pack_gptq(q, s, z, torch.arange(128) // 32, v1=True, bits=8)
    assert (packed["qzeros"] == -0x01010101).all()  # 8 bits: one borrow per byte
    layer = unpack_layer(HubScheme("gptq", "gptq", 32, bits=8), packed, (64, 128), "layer")
    assert torch.equal(layer.zeros, torch.zeros(64, 4, dtype=torch.uint8))


@pytest.mark.parametrize("method", ["gptq-v1", "awq"])
def test_native_layer_holds_the_values_exactly_or_within_fp16_rounding_of_the_zero(
    method: str, native_lib
) -> None:
    for sym in (True, False):
        packed, reference, scheme = layer_case(method, sym, act_order=False)
        layer = build_linear(unpack_layer(scheme, packed, (64, 128), "layer"), None, native=True)
        assert isinstance(layer, BlockQuantLinear)
        w = layer.dequantize()
        if sym:  # every zero point 8
            assert layer.ggml_type == "Q4_0" and torch.equal(w, reference)
        else:  # m = -s z rounded to fp16
            assert layer.ggml_type == "Q4_1"
            bound = (reference.abs().amax() + 1) * 2**-11
            assert (w - reference).abs().max() <= bound


def test_8_bit_native_layer_is_q8_0_exactly_or_q8_m_within_fp16_rounding_of_the_zero(native_lib) -> None:
    for sym in (True, False):
        packed, reference, scheme = layer_case("gptq-v1", sym, act_order=False, bits=8)
        layer = build_linear(unpack_layer(scheme, packed, (64, 128), "layer"), None, native=True)
        assert isinstance(layer, BlockQuantLinear) and layer.bits == 8
        w = layer.dequantize()
        if sym:  # every zero point 128: w = s (q - 128)
            assert layer.ggml_type == "Q8_0" and torch.equal(w, reference)
        else:  # m = s (128 - z) rounded to fp16
            assert layer.ggml_type == "Q8_M"
            s = packed["scales"].float().t().repeat_interleave(32, dim=1)  # [N, K]
            assert ((w - reference).abs() <= 128 * s * 2**-11).all()
            assert not torch.equal(w, reference)  # (so the bound above is what is tested)
        x = torch.randn(3, 128)
        expected = x @ reference.t()
        assert torch.allclose(layer(x), expected, rtol=0, atol=0.01 * expected.abs().max())


def test_8_bit_layers_off_the_native_kernel() -> None:
    """Per output row and symmetric: an `Int8Linear`, exact; with groups: 16-bit weights."""
    packed, reference, _ = layer_case("gptq-v2", sym=True, act_order=False, group_size=128, bits=8)
    scheme = HubScheme("gptq", "gptq_v2", -1, bits=8)
    layer = build_linear(unpack_layer(scheme, packed, (64, 128), "layer"), None, native=False)
    assert isinstance(layer, Int8Linear) and torch.equal(layer.dequantize(), reference)
    packed, reference, scheme = layer_case("gptq-v2", sym=False, act_order=False, bits=8)
    layer = build_linear(unpack_layer(scheme, packed, (64, 128), "layer"), None, native=False)
    assert isinstance(layer, HalfLinear) and layer.weight16.dtype == torch.float16
    assert torch.equal(layer.weight16, reference.half())


def test_int4_layer_holds_the_values_within_bf16_rounding() -> None:
    packed, reference, scheme = layer_case("gptq-v1", sym=False, act_order=False, group_size=64)
    layer = build_linear(unpack_layer(scheme, packed, (64, 128), "layer"), None, native=False)
    assert isinstance(layer, Int4Linear) and layer.group_size == 64
    w = layer.dequantize()
    s = torch.from_numpy(packed["scales"].float().numpy()).t().repeat_interleave(64, dim=1)  # [N, K]
    assert ((w - reference).abs() <= 16 * s * 2**-8).all()  # |q - 8| s and |8 - z| s, each to 2^-8


def test_per_channel_group_runs_on_int4_groups_that_divide_it() -> None:
    packed, reference, _ = layer_case("gptq-v2", sym=True, act_order=False, group_size=128)
    layer = build_linear(unpack_layer(HubScheme("gptq", "gptq_v2", -1), packed, (64, 128), "l"), None, False)
    assert layer.group_size == 128
    assert torch.allclose(layer.dequantize(), reference, atol=2e-3)


def test_shorter_last_group_as_gptq_writes_576_wide_layers_at_128(native_lib) -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 96) * 0.05  # groups of 64: one of 64 inputs, one of 32
    q, s, z = quantize(w, 64, sym=False)
    assert s.shape == (64, 2)
    g_idx = torch.arange(96) // 64
    reference = dequantized(q, s, z, g_idx)
    packed = pack_gptq(q, s, z, g_idx, v1=False)
    unpacked = unpack_layer(HubScheme("gptq", "gptq_v2", 64), packed, (64, 96), "layer")
    assert torch.equal(unpacked.dequantize(), reference)
    for native in (True, False):
        layer = build_linear(unpacked, None, native=native)
        assert isinstance(layer, BlockQuantLinear if native else Int4Linear)
        assert torch.allclose(layer.dequantize(), reference, rtol=0, atol=16 * s.max() * 2**-8)


def test_act_order_layer_gathers_its_inputs(native_lib) -> None:
    packed, reference, scheme = layer_case("gptq-v1", sym=True, act_order=True)
    unpacked = unpack_layer(scheme, packed, (64, 128), "layer")
    assert unpacked.order is not None and torch.equal(unpacked.dequantize(), reference)
    layer = build_linear(unpacked, None, native=True)
    assert isinstance(layer, ReorderedInputLinear)
    assert torch.equal(layer.dequantize(), reference)
    x = torch.randn(3, 128)
    expected = x @ reference.t()
    assert torch.allclose(layer(x), expected, rtol=0, atol=0.02 * expected.abs().max())
    # without the gather the product is a different one
    assert not torch.allclose(layer.inner(x), expected, rtol=0, atol=0.2 * expected.abs().max())


# --- whole checkpoints ------------------------------------------------------------------------------


IDS_FOR_LOGITS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 64, 128, 9]])


def write_hub_checkpoint(
    src: Path, dst: Path, method: str, *, sym: bool, act_order: bool, bits: int = 4
) -> dict:
    """A tiny model's checkpoint with its decoder projections packed as `method` writes them (group 32),
    plus config.json's quantization_config; returns the reference state dict (s (q - z) weights)."""
    state = load_file(str(src / "model.safetensors"))

    def pack(module: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n, k = tensor.shape
        g_idx = act_order_g_idx(k, 32, seed=n + k) if act_order else torch.arange(k) // 32
        order = g_idx.argsort(stable=True)
        q, s, z = quantize(tensor[:, order], 32, sym, bits)  # each group's inputs quantized together
        q = q[:, order.argsort()]
        parts = pack_awq(q, s, z) if method == "awq" else pack_gptq(q, s, z, g_idx, v1=True, bits=bits)
        if method == "gptq" and f"{module}.bias" not in state:  # AutoGPTQ's QuantLinear always has one
            parts["bias"] = torch.zeros(n, dtype=torch.float16)
        return parts, dequantized(q, s, z, g_idx)

    config = (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
        if method == "awq"
        else {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": 32,
            "desc_act": act_order,
            "sym": sym,
            "checkpoint_format": "gptq",
        }
    )
    return state | write_quantized(src, dst, pack, config)


def reference_logits(hf_model, state: dict, ids: torch.Tensor) -> torch.Tensor:
    import copy

    model = copy.deepcopy(hf_model)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize(
    ("method", "sym", "act_order"), [("gptq", True, False), ("gptq", False, True), ("awq", False, False)]
)
def test_hub_checkpoint_logits_match_transformers(tiny_models, tmp_path, method, sym, act_order) -> None:
    hf_model, src = tiny_models["llama"]
    state = write_hub_checkpoint(src, tmp_path / "q", method, sym=sym, act_order=act_order)
    ids = IDS_FOR_LOGITS
    expected = reference_logits(hf_model, state, ids)
    llm = LLM.load(tmp_path / "q")
    with torch.no_grad():
        got = llm.model(ids)[0]  # [T, vocab]
    # measured: 1e-5 to 6e-4 of the largest logit on the native kernel, 3e-3 on the int4 kernels
    assert torch.allclose(got, expected, rtol=0, atol=0.01 * expected.abs().max())
    unquantized = reference_logits(hf_model, load_file(str(src / "model.safetensors")), ids)
    assert not torch.allclose(got, unquantized, rtol=0, atol=0.02 * unquantized.abs().max())  # 5-7% off
    float_linears = [name for name, m in llm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert float_linears == ["lm_head"]  # every decoder projection was built from its codes


@pytest.mark.parametrize(("sym", "act_order"), [(True, False), (False, True)])
def test_8_bit_gptq_checkpoint_logits_match_transformers(tiny_models, tmp_path, sym, act_order) -> None:
    hf_model, src = tiny_models["llama"]
    state = write_hub_checkpoint(src, tmp_path / "q", "gptq", sym=sym, act_order=act_order, bits=8)
    expected = reference_logits(hf_model, state, IDS_FOR_LOGITS)
    llm = LLM.load(tmp_path / "q", fuse=False)
    with torch.no_grad():
        got = llm.model(IDS_FOR_LOGITS)[0]  # [T, vocab]
    # measured: 1.6e-5 (Q8_0) and 8.3e-5 (Q8_M, act-order) of the largest logit; 8-bit rounding itself
    # moves them 4.0e-3 and 2.7e-3 from the float model's
    assert torch.allclose(got, expected, rtol=0, atol=3e-4 * expected.abs().max())
    layers = [m.inner if act_order else m for n, m in llm.model.named_modules() if n.endswith(PROJECTIONS)]
    assert len(layers) == 7 * 2 and all(isinstance(m, BlockQuantLinear) for m in layers)
    assert {m.ggml_type for m in layers} == {"Q8_0" if sym else "Q8_M"}
    assert (
        describe(tmp_path / "q").quantization == f"gptq 8-bit, group size 32{'' if sym else ', asymmetric'}"
    )
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert ("ReorderedInputLinear" in kinds) == act_order
    if act_order:  # the inner layers alone would save without their input order
        with pytest.raises(InvalidArgumentError, match="act-order"):
            save_quantized(llm.model, tmp_path / "saved", "gptq")
        assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_unsupported_schemes_are_one_line_errors() -> None:
    base = {"bits": 4, "group_size": 128}
    cases = {
        "hqq": ({"quant_method": "hqq"}, "'hqq'"),
        "torchao": ({"quant_method": "torchao"}, "8-bit gptq and compressed-tensors, 4-bit awq, fp8"),
        "3 bits": ({**base, "quant_method": "gptq", "bits": 3}, "3 bits, Lamina reads 4 and 8-bit"),
        "awq 8 bits": ({**base, "quant_method": "awq", "bits": 8}, "8 bits, Lamina reads 4-bit"),
        "gemv": ({**base, "quant_method": "awq", "version": "gemv"}, "'gemv'"),
        "marlin": ({**base, "quant_method": "gptq", "checkpoint_format": "marlin"}, "'marlin'"),
        "group 16": ({**base, "quant_method": "gptq", "group_size": 16}, "group size 16"),
    }
    for what, (config, needle) in cases.items():
        with pytest.raises(CheckpointError, match=needle) as err:
            hub_scheme({"quantization_config": config})
        assert "\n" not in str(err.value), what
    assert hub_scheme({}) is None
    assert hub_scheme({"quantization_config": {**base, "quant_method": "awq"}}).method == "awq"


def test_old_autogptq_folder_with_quantize_config_json(tmp_path) -> None:
    (tmp_path / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 128, "desc_act": True})
    )
    assert hub_scheme({}, tmp_path) == HubScheme("gptq", "gptq", 128)


def test_damaged_layers_name_the_tensor() -> None:
    packed, _, scheme = layer_case("gptq-v1", sym=True, act_order=False)
    bad_shape = {**packed, "scales": packed["scales"][:, :32]}
    with pytest.raises(CheckpointError, match=r"layer\.scales .*\(4, 64\)"):
        unpack_layer(scheme, bad_shape, (64, 128), "layer")
    uneven = {**packed, "g_idx": torch.zeros(128, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="g_idx does not put 32 inputs"):
        unpack_layer(scheme, uneven, (64, 128), "layer")
    nan = {**packed, "scales": packed["scales"].clone().fill_(float("nan"))}
    with pytest.raises(CheckpointError, match="NaN"):
        unpack_layer(scheme, nan, (64, 128), "layer")


def test_missing_part_and_requantizing_are_clear_errors(tiny_models, tmp_path, capsys) -> None:
    _, src = tiny_models["llama"]
    write_hub_checkpoint(src, tmp_path / "q", "gptq", sym=True, act_order=False)
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        LLM.load(tmp_path / "q", quantize="int8")
    with pytest.raises(InvalidArgumentError, match="max-memory"):
        LLM.load(tmp_path / "q", max_memory={"cpu": "100MB"})
    assert cli_main(["plan", str(tmp_path / "q"), "--max-memory", "cpu=100MB"]) != 0
    assert "placement plans float weights only" in capsys.readouterr().err  # not a plan it cannot run
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    weights = str(tmp_path / "q" / "model.safetensors")
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights)
    LLM.load(tmp_path / "q")  # AutoGPTQ stores zeros for a layer without a bias: fine
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.full((64,), 0.5)}, weights)
    with pytest.raises(
        CheckpointError, match=r"has a model\.layers\.0\.self_attn\.q_proj\.bias but .* has none"
    ):
        LLM.load(tmp_path / "q")
    del state["model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks model\.layers\.1\.mlp\.down_proj\.qzeros"):
        LLM.load(tmp_path / "q")
    assert (
        cli_main(["generate", "--model", str(tmp_path / "q"), "--prompt", "hi", "--max-new-tokens", "2"]) != 0
    )
    err = capsys.readouterr().err
    assert "down_proj.qzeros" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("method", "sym", "bits"), [("gptq", True, 4), ("awq", False, 4), ("gptq", True, 8), ("gptq", False, 8)]
)
def test_info_describes_the_scheme_and_its_loaded_size(
    tiny_models, tmp_path, method, sym, bits, native_lib
) -> None:
    _, src = tiny_models["llama"]
    write_hub_checkpoint(src, tmp_path / "q", method, sym=sym, act_order=False, bits=bits)
    info = describe(tmp_path / "q")
    assert info.quantization == f"{method} {bits}-bit, group size 32" + ("" if sym else ", asymmetric")
    stored = f"{method.upper()} {bits}-bit"
    assert info.stored_types[stored] == info.linear_stored_types[stored] == info.linear_parameters
    assert info.kept_bytes() == sum(LLM.load(tmp_path / "q", fuse=False).memory_footprint().values())
    assert "float32" not in render(info, 64)  # it runs as stored only


def test_info_names_a_scheme_lamina_cannot_load(tiny_models, tmp_path) -> None:
    _, src = tiny_models["llama"]
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert describe(tmp_path / "m").quantization == "torchao (Lamina cannot load it)"
    with pytest.raises(CheckpointError, match="'torchao'"):
        LLM.load(tmp_path / "m")


def test_old_autoawq_folder_with_its_quant_config_json(tiny_models, tmp_path) -> None:
    """AutoAWQ once wrote its scheme to quant_config.json, the name of Lamina's own scheme file: such a
    folder loads as AWQ, not as a damaged `lamina quantize` directory."""
    from lamina.quant.checkpoint import is_quantized_dir

    hf_model, src = tiny_models["llama"]
    state = write_hub_checkpoint(src, tmp_path / "q", "awq", sym=False, act_order=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    awq = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps(awq))
    assert not is_quantized_dir(tmp_path / "q")
    expected = reference_logits(hf_model, state, IDS_FOR_LOGITS)
    with torch.no_grad():
        got = LLM.load(tmp_path / "q").model(IDS_FOR_LOGITS)[0]
    assert torch.allclose(got, expected, rtol=0, atol=0.01 * expected.abs().max())


def test_sharded_qwen2_gptq_checkpoint_with_biases(tiny_models, tmp_path) -> None:
    """Qwen2's q/k/v biases beside their packed weights, the tensors spread over two shards (each
    layer's qweight in one, its scales and bias in the other), as large GPTQ uploads are."""
    hf_model, src = tiny_models["qwen2"]
    shutil.copytree(src, tmp_path / "src")
    float_state = load_file(str(src / "model.safetensors"))
    torch.manual_seed(1)
    biased = {n: torch.randn_like(t) * 0.1 if n.endswith("_proj.bias") else t for n, t in float_state.items()}
    assert len(biased) - sum(t is float_state[n] for n, t in biased.items()) == 2 * 3  # q/k/v, two layers
    save_file(biased, str(tmp_path / "src" / "model.safetensors"))
    state = write_hub_checkpoint(tmp_path / "src", tmp_path / "q", "gptq", sym=True, act_order=False)
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert torch.equal(
        stored["model.layers.0.self_attn.q_proj.bias"], biased["model.layers.0.self_attn.q_proj.bias"]
    )
    second = [n for n in stored if n.endswith((".scales", ".bias"))]  # apart from their qweight
    halves = {
        "model-00001-of-00002.safetensors": [n for n in stored if n not in second],
        "model-00002-of-00002.safetensors": second,
    }
    for file, part in halves.items():
        save_file({n: stored[n] for n in part}, str(tmp_path / "q" / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (tmp_path / "q" / "model.safetensors").unlink()
    (tmp_path / "q" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    layer = "model.layers.0.self_attn.q_proj"
    assert weight_map[f"{layer}.qweight"] != weight_map[f"{layer}.scales"]
    expected = reference_logits(hf_model, state, IDS_FOR_LOGITS)
    with torch.no_grad():
        got = LLM.load(tmp_path / "q").model(IDS_FOR_LOGITS)[0]
    assert torch.allclose(got, expected, rtol=0, atol=0.01 * expected.abs().max())
