"""Hugging Face model directories: `config.json` plus safetensors or `pytorch_model.bin` weights.

Handles one file or a sharded set described by `*.index.json`. Safetensors files are memory-mapped
by the `safetensors` library and read one tensor at a time; `.bin` files are opened with
`torch.load(weights_only=True, mmap=True)`, which never runs code from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lamina.errors import CheckpointError
from lamina.loading.checkpoint import Checkpoint, read_json
from lamina.loading.weight_files import open_weights_file, read_tensor, tensor_files


class HFDirectoryCheckpoint(Checkpoint):
    """An HF directory; tensors map to the shard file that holds them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = _read_config(path / "config.json")
        self.file_of = tensor_files(path)  # HF name -> shard path
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
        return read_tensor(self._open(file), file, name)

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
            self._handles[file] = open_weights_file(file)
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()

    def release_pages(self) -> None:
        self._handles.clear()  # their maps go once nothing read through them is left; reopened on demand


def _read_config(file: Path) -> dict[str, Any]:
    """config.json as a dict; `read_json` says what is wrong with a damaged one, this adds the fix."""
    try:
        return read_json(file)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; fix the JSON or re-download the model") from None
