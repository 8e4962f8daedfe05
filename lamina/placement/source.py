"""Reading checkpoint tensors shard by shard, for any module and any checkpoint layout.

`load_and_dispatch` accepts a `.safetensors` file, a directory (one file or a sharded set with
`*.index.json`), a `pytorch_model.bin`, or an opened Lamina `Checkpoint` (which also covers GGUF).
Shards are opened one at a time (`lamina.loading.weight_files`) and released before the next, so
the file pages a load touches stay bounded by one shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from lamina.loading.weight_files import tensor_files


class TensorReader(Protocol):
    """What Lamina's `Checkpoint` offers: names, and one tensor at a time on the CPU."""

    def tensor_names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class WeightFiles:
    """Tensors of a weights file, directory or index, by name; `shards()` yields one file at a time."""

    def __init__(self, path: str | Path, file_of: dict[str, Path] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.file_of = dict(file_of) if file_of is not None else tensor_files(self.path)

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
