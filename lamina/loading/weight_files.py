"""Which file holds which tensor, for a weights file, a directory or a sharded index; opening them.

Shared by `HFDirectoryCheckpoint` and `lamina.placement` (which also accepts a bare file or index
for any module). Safetensors files are memory-mapped by the `safetensors` library; `.bin` files are
opened with `torch.load(weights_only=True, mmap=True)`, which never runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lamina.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it: from an index, one weights file, or a directory's
    index / single file / every `*.safetensors` (in that order of preference)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .safetensors file or a directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{path} is not a .safetensors, .bin or .index.json file")
        return dict.fromkeys(_names_in(path), path)
    for name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / name).is_file():
            return _from_index(path / name)
    for name in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (path / name).is_file():
            return dict.fromkeys(_names_in(path / name), path / name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} holds no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or *.safetensors)"
        )
    return {name: file for file in files for name in _names_in(file)}


def open_weights_file(file: Path) -> Any:
    """A safetensors handle (tensors are mmap-backed) or a mmap'd `.bin` state dict."""
    if not file.is_file():
        raise CheckpointError(f"weights file {file} is missing; the checkpoint is incomplete")
    if file.suffix == ".safetensors":
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{file} is not a valid safetensors file, truncated or corrupt "
                f"({' '.join(str(exc).split())}); {_remedy(file)}"
            ) from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"{file} is not a readable PyTorch checkpoint ({exc}); re-download it"
        ) from None


def _remedy(file: Path) -> str:
    """How to replace a damaged weights file: one `lamina quantize` wrote (its directory has the
    scheme file) is written again, any other is downloaded again."""
    scheme = file.parent / "quant_config.json"
    if scheme.is_file() and not is_autoawq_config(scheme):
        return "re-run `lamina quantize` to write it again"
    return "re-download it"


def is_autoawq_config(path: Path) -> bool:
    """Whether `path` is AutoAWQ's quant_config.json ({"w_bit": 4, "q_group_size": 128, ...}), not the
    scheme file `lamina quantize` writes under the same name."""
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # damaged: whoever reads it as Lamina's says so
    return isinstance(raw, dict) and "w_bit" in raw and "format" not in raw


def read_tensor(handle: Any, file: Path, name: str) -> torch.Tensor:
    """One tensor from an opened file; a failure is a CheckpointError naming the tensor and file."""
    try:
        return handle.get_tensor(name) if file.suffix == ".safetensors" else handle[name]
    except (SafetensorError, KeyError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}") from None


def _names_in(file: Path) -> list[str]:
    return list(open_weights_file(file).keys())


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {index}: {exc}; re-download it") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; the index file is damaged, re-download it")
    return {name: index.parent / shard for name, shard in weight_map.items()}
