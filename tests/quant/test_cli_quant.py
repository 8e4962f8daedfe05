"""`lamina quantize`, `lamina perplexity`, `--quantize` on generate, and LLM.load(quantize=...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.api import LLM
from lamina.cli import main
from lamina.errors import CheckpointError
from lamina.quant.checkpoint import SCHEME_FILE


def greedy(llm: LLM) -> str:
    return llm.generate("The", max_new_tokens=6, temperature=0)


@pytest.mark.parametrize("method", ["int4", "gptq", "nf4"])
def test_quantize_writes_a_checkpoint_generate_loads(
    tiny_llama_dir: Path, tmp_path: Path, method: str, capsys
) -> None:
    out = tmp_path / "q"
    groups = ["--group-size", "32"] if method != "nf4" else []  # nf4's blocks are 64 weights
    assert main(["quantize", str(tiny_llama_dir), "--method", method, *groups, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "14/14" in err  # the progress bar reached every layer
    scheme = json.loads((out / SCHEME_FILE).read_text())
    assert scheme["method"] == method and len(scheme["layers"]) == 14
    # The saved checkpoint loads directly and runs exactly like the model that was quantized in memory.
    quantized = LLM.load(out, device="cpu")
    in_memory = (
        LLM.load(tiny_llama_dir, device="cpu", quantize=method, group_size=32) if method != "gptq" else None
    )
    text = greedy(quantized)
    if in_memory is not None:
        assert text == greedy(in_memory)
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "The",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == text.strip()
    with pytest.raises(ValueError, match="already quantized"):
        LLM.load(out, device="cpu", quantize="int8")


def test_quantize_on_load_shrinks_the_footprint(tiny_llama_dir: Path) -> None:
    full = LLM.load(tiny_llama_dir, device="cpu").memory_footprint()["cpu"]
    int8 = LLM.load(tiny_llama_dir, device="cpu", quantize="int8").memory_footprint()["cpu"]
    layer_weights = 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128)  # q,o 64x64; k,v 32x64; 3 MLP 64x128
    assert full - int8 == pytest.approx(layer_weights * 3, abs=2 * 14 * 128 * 4)  # 4 -> 1 byte (+ scales)


def test_perplexity_json(tiny_llama_dir: Path, capsys) -> None:
    args = [
        "perplexity",
        str(tiny_llama_dir),
        "--max-tokens",
        "300",
        "--context",
        "128",
        "--stride",
        "64",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"perplexity", "tokens"} and result["tokens"] == 299 and result["perplexity"] > 1
    assert main([*args, "--quantize", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["perplexity"] == pytest.approx(result["perplexity"], rel=0.02)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gptq", "--calibration", "EMPTY"], "is empty"),
        (["--method", "gptq", "--calibration", "/no/such/file.txt"], "does not exist"),
        (["--method", "int4", "--group-size", "48"], "use one of [32, 64, 128, 256]"),
        (["--method", "int8", "--group-size", "64"], "--method int8 has no groups; drop --group-size"),
        (["--method", "int4", "--calibration", "EMPTY"], "--calibration applies to --method gptq only"),
        (["--method", "nf4", "--no-act-order"], "--act-order/--no-act-order applies to --method gptq only"),
    ],
)
def test_quantize_bad_input_is_one_line_error(
    tiny_llama_dir: Path, tmp_path: Path, args, message, capsys
) -> None:
    (tmp_path / "empty.txt").write_text("")
    args = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in args]
    assert main(["quantize", str(tiny_llama_dir), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lamina: error: ") and message in err and err.count("\n") == 1


def test_unknown_quantize_method_lists_the_valid_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--quantize", "int3"])
    assert "nf4-dq" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid methods: int8, int4, int4-minmax, nf4"):
        LLM.load(quantize="int3")


def test_default_gguf_stays_quantized_near_its_file_size(default_gguf: Path) -> None:
    llm = LLM.load(device="cpu")
    resident = llm.memory_footprint()["cpu"]
    assert resident < 1.1 * default_gguf.stat().st_size
    assert "Paris" in llm.generate("The capital of France is", max_new_tokens=4, temperature=0)


def test_saved_checkpoint_missing_a_float_weight(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--method", "int8", "--out", str(out)]) == 0
    tensors = load_file(out / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\).*model\.norm\.weight"):
        LLM.load(out, device="cpu")
