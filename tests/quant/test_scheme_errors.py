"""A quantized directory that was edited, damaged or left half-written is named with its fix.

- quant_config.json: each layer entry's fields are checked when the scheme is read, so a value the
  layer classes would crash on (group_size 0 or null, in_features null, an unknown nf4 quant_type,
  a threshold that is not a number, ...) is one `CheckpointError` line naming the file, the layer
  and the field, never a ZeroDivisionError/TypeError/KeyError; values that would load but mean
  something else (a block_size Lamina does not use, a quant_type that contradicts the method) too.
- a truncated model.safetensors in such a directory says to quantize again, not to re-download.
- a `lamina quantize` killed outright (SIGKILL) leaves its hidden staging directory behind; the next
  save to the same --out removes it, but never one a live writer still holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from lamina.api import LLM
from lamina.cli import main
from lamina.errors import CheckpointError
from lamina.models.llama import LlamaForCausalLM
from lamina.quant.apply import quantize_model, set_submodule
from lamina.quant.blockq import blockq_linear_from_gguf
from lamina.quant.checkpoint import (
    SCHEME_FILE,
    WEIGHTS_FILE,
    load_quantized_into,
    read_scheme,
    remove_stale_stages,
    save_quantized,
    staged_output,
)

from .conftest import tiny_config

LAYER = "model.layers.0.self_attn.q_proj"  # 64 inputs, 64 outputs in the tiny model
FIX = "; re-run `lamina quantize`"


def reload(directory: Path) -> nn.Module:
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    load_quantized_into(model, directory)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """method -> a directory saved from the tiny Llama quantized with it (copied before editing)."""
    dirs = {}
    for method in ("int8", "int4", "nf4", "nf4-dq", "llm.int8", "bf16", "fp8", "gguf"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config()).eval().requires_grad_(False)
        if method == "gguf":  # GGUF blocks kept as stored
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Linear) and name != "lm_head":
                    data = quants.quantize(module.weight.numpy(), GGMLQuantizationType.Q4_1)
                    set_submodule(
                        model, name, blockq_linear_from_gguf(data, "Q4_1", tuple(module.weight.shape))
                    )
        else:
            quantize_model(model, method, group_size=32)
        dirs[method] = save_quantized(model, tmp_path_factory.mktemp(method.replace(".", "_")), method)
    return dirs


def edited(saved: dict[str, Path], method: str, tmp_path: Path, fields: dict[str, object]) -> Path:
    """A copy of `method`'s directory with LAYER's entry changed (a value of DELETE removes the field)."""
    directory = tmp_path / "q"
    shutil.copytree(saved[method], directory)
    path = directory / SCHEME_FILE
    scheme = json.loads(path.read_text())
    entry = scheme["layers"][LAYER]
    for key, value in fields.items():
        if value is DELETE:
            del entry[key]
        else:
            entry[key] = value
    path.write_text(json.dumps(scheme))
    return directory


DELETE = object()


@pytest.mark.parametrize(
    ("method", "fields", "problem"),
    [
        # int4's group size: was a ZeroDivisionError (0), a TypeError (null), or silently taken by int()
        ("int4", {"group_size": 0}, "has group_size 0, not a positive integer"),
        ("int4", {"group_size": None}, "has group_size None, not a positive integer"),
        ("int4", {"group_size": -32}, "has group_size -32, not a positive integer"),
        ("int4", {"group_size": "32"}, "has group_size '32', not a positive integer"),
        ("int4", {"group_size": 32.0}, "has group_size 32.0, not a positive integer"),
        ("int4", {"group_size": True}, "has group_size True, not a positive integer"),
        ("int4", {"group_size": 16}, "has group_size 16, not one of [32, 64, 128, 256]"),
        ("int4", {"group_size": 128}, "has group_size 128, which does not divide its in_features 64"),
        ("int4", {"group_size": DELETE}, "lacks field 'group_size'"),
        # every method's sizes: was a TypeError from int(None)
        ("int8", {"in_features": None}, "has in_features None, not a positive integer"),
        ("int8", {"out_features": -64}, "has out_features -64, not a positive integer"),
        ("int8", {"in_features": "64"}, "has in_features '64', not a positive integer"),
        ("bf16", {"out_features": 0}, "has out_features 0, not a positive integer"),
        ("llm.int8", {"in_features": DELETE}, "lacks field 'in_features'"),
        # nf4's options: an unknown quant_type was a KeyError; the others loaded silently
        ("nf4", {"quant_type": "bogus"}, "has quant_type 'bogus', not one of ['fp4', 'nf4']"),
        ("nf4", {"quant_type": ["nf4"]}, "has quant_type ['nf4'], not one of ['fp4', 'nf4']"),
        ("nf4", {"quant_type": "fp4"}, "has method 'nf4' but quant_type 'fp4' and double_quant false"),
        ("nf4", {"double_quant": True}, "has method 'nf4' but quant_type 'nf4' and double_quant true"),
        ("nf4-dq", {"double_quant": "yes"}, "has double_quant 'yes', not true or false"),
        ("nf4", {"block_size": 0}, "has block_size 0, not 64"),
        ("nf4", {"block_size": None}, "has block_size None, not 64"),
        ("nf4", {"block_size": 128}, "has block_size 128, not 64"),
        # fp8's scale blocks
        ("fp8", {"scale_block": [0, 64]}, "has scale_block [0, 64], not two positive sizes"),
        ("fp8", {"scale_block": 64}, "has scale_block 64, not two positive sizes"),
        ("fp8", {"scale_block": DELETE}, "lacks field 'scale_block'"),
        # llm.int8's outlier threshold
        ("llm.int8", {"threshold": "6"}, "has threshold '6', not a number above 0"),
        ("llm.int8", {"threshold": None}, "has threshold None, not a number above 0"),
        ("llm.int8", {"threshold": -1}, "has threshold -1, not a number above 0"),
        ("llm.int8", {"threshold": float("nan")}, "has threshold nan, not a number above 0"),
        # GGUF blocks: an unknown block format was a KeyError
        ("gguf", {"ggml_type": "Q9_9"}, "has ggml_type 'Q9_9', not one of"),
    ],
)
def test_bad_layer_fields_are_named(
    saved: dict[str, Path], tmp_path: Path, method: str, fields: dict, problem: str
) -> None:
    directory = edited(saved, method, tmp_path, fields)
    with pytest.raises(CheckpointError) as error:
        reload(directory)
    message = str(error.value)
    assert message.startswith(f"{directory / SCHEME_FILE}: layer {LAYER} {problem}"), message
    assert message.endswith(FIX) and "\n" not in message


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "nf4-dq", "llm.int8", "bf16", "gguf"])
def test_saved_schemes_pass_the_checks(saved: dict[str, Path], method: str) -> None:
    assert read_scheme(saved[method])["layers"][LAYER]["in_features"] == 64
    reload(saved[method])


@pytest.mark.parametrize("method", [[1], {"m": 1}, None])
def test_unhashable_or_missing_method_is_unknown(
    saved: dict[str, Path], tmp_path: Path, method: object
) -> None:
    directory = edited(saved, "int8", tmp_path, {"method": method})
    with pytest.raises(CheckpointError, match=f"layer {LAYER} has unknown method"):
        read_scheme(directory)


@pytest.mark.parametrize(("version", "shown"), [("1", "'1'"), (True, "True"), (2, "2"), (None, "None")])
def test_scheme_version_shows_its_type(saved: dict[str, Path], tmp_path: Path, version, shown) -> None:
    """ "1" (a string) and true are not version 1; the message shows them as they are (it said
    "has scheme version 1, this Lamina reads 1")."""
    directory = tmp_path / "q"
    shutil.copytree(saved["int8"], directory)
    path = directory / SCHEME_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": version}))
    with pytest.raises(CheckpointError, match=f"has scheme version {shown}, this Lamina reads 1; re-run"):
        read_scheme(directory)


def test_scheme_without_a_method_name(saved: dict[str, Path], tmp_path: Path) -> None:
    """The top-level method is what messages name (`already quantized with ...`): it must be a name."""
    directory = tmp_path / "q"
    shutil.copytree(saved["int8"], directory)
    path = directory / SCHEME_FILE
    scheme = json.loads(path.read_text())
    del scheme["method"]
    path.write_text(json.dumps(scheme))
    with pytest.raises(
        CheckpointError, match=r"has method None, not a method name; re-run `lamina quantize`"
    ):
        read_scheme(directory)


def test_from_tensors_failures_become_one_line(saved: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The safety net: whatever a layer's `from_tensors` still raises names the layer and the fix."""
    from lamina.quant.int8 import Int8Linear

    def broken(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(Int8Linear, "from_tensors", broken)
    with pytest.raises(CheckpointError) as error:
        reload(saved["int8"])
    message = str(error.value)
    assert f"layer {LAYER} cannot be rebuilt from its entry and tensors (ZeroDivisionError: " in message
    assert message.endswith(FIX)


# --- through the CLI: a directory written by `lamina quantize` ---


@pytest.fixture(scope="module")
def cli_quantized(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "q"
    assert (
        main(["quantize", str(tiny_llama_dir), "--method", "int4", "--group-size", "32", "--out", str(out)])
        == 0
    )
    return out


def generate(model: Path) -> int:
    return main(
        ["generate", "--model", str(model), "-p", "hi", "--max-new-tokens", "2", "--temperature", "0"]
    )


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lamina: error: ") and "Traceback" not in err, err
    return err.strip()


def test_cli_group_size_zero(cli_quantized: Path, tmp_path: Path, capsys) -> None:
    directory = tmp_path / "q"
    shutil.copytree(cli_quantized, directory)
    path = directory / SCHEME_FILE
    scheme = json.loads(path.read_text())
    scheme["layers"]["model.layers.0.mlp.down_proj"]["group_size"] = 0
    path.write_text(json.dumps(scheme))
    assert generate(directory) == 2
    assert one_line_error(capsys) == (
        f"lamina: error: {path}: layer model.layers.0.mlp.down_proj has group_size 0, not a positive integer"
        + FIX
    )


@pytest.mark.parametrize("size", [0, 1000, -100])
def test_truncated_weights_say_quantize_again(cli_quantized: Path, tmp_path: Path, size: int, capsys) -> None:
    """A quantized directory is not downloaded: its damaged weights file is made again with `lamina
    quantize` (generic loading said "re-download it")."""
    directory = tmp_path / "q"
    shutil.copytree(cli_quantized, directory)
    weights = directory / WEIGHTS_FILE
    os.truncate(weights, size if size >= 0 else weights.stat().st_size + size)
    with pytest.raises(
        CheckpointError, match=r"truncated or corrupt .*; re-run `lamina quantize` to write it again$"
    ):
        LLM.load(directory)
    assert generate(directory) == 2
    assert f"{weights} is not a valid safetensors file" in one_line_error(capsys)


# --- a save killed outright leaves its staging directory; the next save to that --out removes it ---


def stage_names(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_stale_staging_dirs_are_removed_live_ones_kept(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    killed = tmp_path / ".q.partial-0badf00d"  # a writer killed mid-save: nobody holds its lock
    killed.mkdir()
    (killed / WEIGHTS_FILE).write_bytes(b"\0" * 1000)
    old = tmp_path / ".q.partial-1a2b3c4d"  # left by a Lamina that did not lock its stages
    old.mkdir()
    live = tmp_path / ".q.partial-5e6f7a8b"  # another save to the same --out, still writing
    live.mkdir()
    (live / WEIGHTS_FILE).write_bytes(b"partial")
    other = tmp_path / ".other.partial-deadbeef"  # a stage of another --out
    other.mkdir()
    held = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["quantize", str(tiny_llama_dir), "--method", "int8", "--out", str(out)]) == 0
        assert stage_names(tmp_path) == sorted([live.name, other.name])
        assert (live / WEIGHTS_FILE).read_bytes() == b"partial"
    finally:
        os.close(held)
    assert remove_stale_stages(out) == [live]  # its writer is gone now
    assert stage_names(tmp_path) == [other.name]
    assert (out / WEIGHTS_FILE).is_file()


def test_a_writer_holds_its_stage_until_done(tmp_path: Path) -> None:
    out = tmp_path / "q"
    with staged_output(out) as stage:
        (stage / "x").write_text("x")
        assert remove_stale_stages(out) == [] and stage.is_dir()
    assert (out / "x").read_text() == "x" and stage_names(tmp_path) == []


WRITER = """
import sys, time
from pathlib import Path
from lamina.quant.checkpoint import staged_output
with staged_output(Path(sys.argv[1])) as stage:
    (stage / "model.safetensors").write_bytes(b"half")
    print(stage, flush=True)
    time.sleep(60)
"""


def test_sigkilled_save_leaves_a_stage_the_next_save_removes(tmp_path: Path) -> None:
    out = tmp_path / "q"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        stage = Path(writer.stdout.readline().strip())
        assert stage.parent == tmp_path and stage.name.startswith(".q.partial-")
        assert remove_stale_stages(out) == [] and stage.is_dir()  # its writer is alive
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert stage.is_dir() and not out.exists()  # SIGKILL: no cleanup ran
    with staged_output(out) as new_stage:
        assert not stage.exists()
        (new_stage / "x").write_text("x")
    assert stage_names(tmp_path) == [] and (out / "x").is_file()
