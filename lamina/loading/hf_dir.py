"""Hugging Face model directories: `config.json` plus safetensors or `pytorch_model.bin` weights.

Handles one file or a sharded set described by `*.index.json`. Safetensors files are memory-mapped
by the `safetensors` library and read one tensor at a time; `.bin` files are opened with
`torch.load(weights_only=True, mmap=True)`, which never runs code from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lamina.errors import CheckpointError
from lamina.loading.checkpoint import Checkpoint, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class HFDirectoryCheckpoint(Checkpoint):
    """An HF directory; tensors map to the shard file that holds them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = read_json(path / "config.json")
        self.file_of = _tensor_files(path)  # HF name -> shard path
        self._handles: dict[Path, Any] = {}

    def tensor_names(self) -> list[str]:
        return list(self.file_of)

    def files(self) -> list[Path]:
        """The shard files, in the order their tensors first appear (read shard by shard)."""
        return list(dict.fromkeys(self.file_of.values()))

    def read(self, name: str) -> torch.Tensor:
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        handle = self._open(file)
        try:
            if file.suffix == ".safetensors":
                return handle.get_tensor(name)
            return handle[name]
        except (SafetensorError, KeyError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}") from None

    def stored_type(self, name: str) -> str:
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        handle = self._open(file)
        if file.suffix == ".safetensors":
            return handle.get_slice(name).get_dtype()
        return str(handle[name].dtype).removeprefix("torch.").upper()  # mmap'd: no data read

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = _open_weights_file(file)
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()


def _open_weights_file(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"weights file {file} is missing; the checkpoint is incomplete")
    if file.suffix == ".safetensors":
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{file} is not a valid safetensors file, truncated or corrupt ({exc}); re-download it"
            ) from None
        return handle
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"{file} is not a readable PyTorch checkpoint ({exc}); re-download it"
        ) from None


def _tensor_files(path: Path) -> dict[str, Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; the index file is damaged")
            return {name: path / shard for name, shard in weight_map.items()}
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        file = path / single
        if file.is_file():
            handle = _open_weights_file(file)
            return dict.fromkeys(handle.keys(), file)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if len(others) == 1:
        handle = _open_weights_file(path / others[0])
        return dict.fromkeys(handle.keys(), path / others[0])
    raise CheckpointError(
        f"{path} has config.json but no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE})"
    )
