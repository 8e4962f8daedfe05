"""`lamina quantize --out DIR`: bad outputs and sources refused up front, an atomic save that leaves
nothing behind on failure, normal file modes, and saved layers checked against config.json."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from lamina.api import LLM
from lamina.cli import main
from lamina.errors import CheckpointError
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.apply import quantize_model
from lamina.quant.checkpoint import SCHEME_FILE, WEIGHTS_FILE, load_quantized_into, save_quantized

from .conftest import tiny_config

SAVED_FILES = {WEIGHTS_FILE, SCHEME_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"}


def quantize(model: Path, out: Path | str, method: str = "int8") -> int:
    return main(["quantize", str(model), "--method", method, "--out", str(out)])


def one_line_error(capsys) -> str:
    """The CLI's error line (after the progress bar, where quantizing ran), with no traceback."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("lamina: error: ") and err.endswith(f"{last}\n") and "Traceback" not in err, err
    return last


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.startswith(".lamina-")]


@pytest.fixture
def no_loading(monkeypatch) -> None:
    """Make loading the model fail loudly: the error must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(LLM, "load", fail)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("FILE", "is an existing file"),
        ("FILE/sub", "is a file"),
        ("/proc/lamina_out", "/proc is not writable"),
        ("~nonexistentuser/x", "cannot use ~nonexistentuser/x as the output directory"),
    ],
)
def test_unusable_out_is_refused_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, out: str, message: str, no_loading, capsys
) -> None:
    existing = tmp_path / "somefile.txt"
    existing.write_text("keep me")
    assert quantize(tiny_llama_dir, out.replace("FILE", str(existing))) == 2
    assert message in one_line_error(capsys)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]


def test_non_empty_out_is_refused_untouched(tiny_llama_dir: Path, tmp_path: Path, no_loading, capsys) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert quantize(tiny_llama_dir, out) == 2
    assert "is not empty" in one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("existing_empty", [False, True])
def test_ctrl_c_during_the_save_leaves_nothing(
    tiny_llama_dir: Path, tmp_path: Path, existing_empty: bool, monkeypatch
) -> None:
    """Interrupted after model.safetensors is written: --out is as before, and a rerun succeeds."""
    out = tmp_path / "q"
    if existing_empty:
        out.mkdir()

    def interrupted(*args) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("lamina.cli.quantize.save_tokenizer", interrupted)
        assert quantize(tiny_llama_dir, out) == 130
    if existing_empty:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []
    assert quantize(tiny_llama_dir, out) == 0
    assert {p.name for p in out.iterdir()} == SAVED_FILES


def test_write_failure_is_one_line_error_and_leaves_nothing(
    tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    """`ulimit -f`: safetensors fails with "File too large" part way through the weights."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "new" / "q"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # the float embedding alone is 80 KB
    try:
        status = quantize(tiny_llama_dir, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 2
    assert f"cannot write {out}" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # neither --out, nor its new parent, nor a staging directory


def test_saved_files_get_umask_modes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "q"
    previous = os.umask(0o022)
    try:
        assert quantize(tiny_llama_dir, out) == 0
    finally:
        os.umask(previous)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == dict.fromkeys(
        SAVED_FILES, oct(0o644)
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert leftovers(out.parent) == []


def test_save_quantized_weights_mode_follows_the_umask(tiny_model, tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        save_quantized(tiny_model, tmp_path, "none")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / WEIGHTS_FILE).stat().st_mode) == 0o664


def test_an_already_quantized_directory_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    quantized = tmp_path / "q8"
    assert quantize(tiny_llama_dir, quantized) == 0
    capsys.readouterr()
    monkeypatch.setattr(LLM, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert quantize(quantized, tmp_path / "q4", "int4") == 2
    err = one_line_error(capsys)
    assert f"{quantized} is already quantized with int8; quantize the original float checkpoint" in err
    assert not (tmp_path / "q4").exists()


@pytest.fixture
def quantized_llama(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "q"
    assert quantize(tiny_llama_dir, out) == 0
    return out


def edit_config(directory: Path, **changes: int) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_quantized_layers_disagreeing_with_the_config(quantized_llama: Path, capsys) -> None:
    edit_config(quantized_llama, intermediate_size=96)  # the stored MLP layers are 128 wide
    with pytest.raises(
        CheckpointError,
        match=r"quantized layer model\.layers\.0\.mlp\.gate_proj has shape "
        r"\(128, 64\) .* implies \(96, 64\); the config and the weights disagree",
    ):
        LLM.load(quantized_llama, device="cpu")
    assert (
        main(["generate", "--model", str(quantized_llama), "--prompt", "The", "--max-new-tokens", "2"]) == 2
    )
    assert "the config and the weights disagree" in one_line_error(capsys)


def test_float_tensors_disagreeing_with_the_config(quantized_llama: Path) -> None:
    edit_config(
        quantized_llama, vocab_size=340
    )  # the stored embedding has 320 rows (and fewer: see tokenizer)
    with pytest.raises(CheckpointError, match=r"tensor model\.embed_tokens\.weight has shape \(320, 64\) "):
        LLM.load(quantized_llama, device="cpu")


def test_layer_check_in_load_quantized_into(tiny_model, tmp_path: Path) -> None:
    """The same check where the model comes from elsewhere than LLM.load."""
    quantize_model(tiny_model, "int4", group_size=32)
    save_quantized(tiny_model, tmp_path, "int4", group_size=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj has shape \(128, 64\) .* implies \(96, 64\)"):
        load_quantized_into(model, tmp_path)


def test_quantizing_a_gguf_still_works(default_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert quantize(default_gguf, out) == 0
    assert {p.name for p in out.iterdir()} == SAVED_FILES
    assert "Paris" in LLM.load(out, device="cpu").generate(
        "The capital of France is", max_new_tokens=4, temperature=0
    )
