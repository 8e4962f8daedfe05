"""Reading checkpoint tensors shard by shard, for any module and any checkpoint layout.

`load_and_dispatch` accepts a `.safetensors` file, a directory (one file or a sharded set with
`*.index.json`), a `pytorch_model.bin`, or an opened Lamina `Checkpoint` (which also covers GGUF).
Shards are opened one at a time and released before the next, so the file pages a load touches
stay bounded by one shard; `.bin` files are opened with `torch.load(weights_only=True, mmap=True)`,
which never runs code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from lamina.errors import CheckpointError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class TensorReader(Protocol):
    """What Lamina's `Checkpoint` offers: names, and one tensor at a time on the CPU."""

    def tensor_names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class WeightFiles:
    """Tensors of a weights file, directory or index, by name; `shards()` yields one file at a time."""

    def __init__(self, path: str | Path, file_of: dict[str, Path] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.file_of = dict(file_of) if file_of is not None else _tensor_files(self.path)

    def tensor_names(self) -> list[str]:
        return list(self.file_of)

    def shards(self) -> Iterator[tuple[Path, list[str]]]:
        """(file, names in it) in file order."""
        by_file: dict[Path, list[str]] = {}
        for name, file in self.file_of.items():
            by_file.setdefault(file, []).append(name)
        yield from by_file.items()

    def fingerprint(self) -> list[list[Any]]:
        """Name, size and mtime of each file: identifies this checkpoint's content for caching."""
        out = []
        for file in dict.fromkeys(self.file_of.values()):
            stat = file.stat()
            out.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
        return out


def open_file(file: Path) -> Any:
    """A safetensors handle (tensors are mmap-backed) or a mmap'd `.bin` state dict."""
    if not file.is_file():
        raise CheckpointError(f"weights file {file} is missing; the checkpoint is incomplete")
    try:
        if file.suffix == ".safetensors":
            return safe_open(str(file), framework="pt")
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable weights file ({exc}); re-download it") from None


def read_from(handle: Any, file: Path, name: str) -> torch.Tensor:
    """One tensor from an opened file; a missing name is a CheckpointError naming the file."""
    try:
        return handle.get_tensor(name) if file.suffix == ".safetensors" else handle[name]
    except (SafetensorError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}") from None


def _names_in(file: Path) -> list[str]:
    handle = open_file(file)
    return list(handle.keys())


def _tensor_files(path: Path) -> dict[str, Path]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .safetensors file or a directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError(f"{path} is not a .safetensors, .bin or .index.json file")
        return dict.fromkeys(_names_in(path), path)
    for name in INDEX_NAMES:
        if (path / name).is_file():
            return _from_index(path / name)
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return dict.fromkeys(_names_in(path / name), path / name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors, pytorch_model.bin or *.index.json weights")
    return {name: file for file in files for name in _names_in(file)}


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {index}: {exc}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; the index file is damaged")
    return {name: index.parent / shard for name, shard in weight_map.items()}
