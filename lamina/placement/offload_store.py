"""The offload folder: disk-tier layers saved once, one safetensors file per layer, in the run dtype.

Used when the checkpoint cannot be streamed as it is (GGUF blocks, a dtype cast, `.bin`). Each
layer is written as soon as its tensors are complete, so at most one layer is held in memory; files
are written under a temporary name and renamed, and the index is written last, so an interrupted
run leaves no file that looks complete. A later run whose source checkpoint, dtype, layer names and
file sizes match the index reuses the folder without reading the checkpoint's disk-tier tensors at
all; a truncated or replaced file makes it write the folder again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lamina.errors import CheckpointError, InvalidArgumentError

INDEX = "lamina-offload.json"


def default_offload_dir(source: Path, dtype: torch.dtype, blocks: bool = False) -> Path:
    """Per model file, dtype and layout: `$XDG_CACHE_HOME/lamina/offload/<name>-<dtype>[-blocks]`
    (`blocks`: a GGUF's quantized blocks kept, see `lamina.quant.gguf_stream`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = f"{source.stem}-{str(dtype).removeprefix('torch.')}" + ("-blocks" if blocks else "")
    return cache / "lamina" / "offload" / name


def prepare_dir(path: str | Path | None) -> Path:
    """Create `path` if needed and prove it writable; a clear error otherwise."""
    if path is None:
        raise InvalidArgumentError(
            "some layers are placed on disk and must be converted; pass offload_dir (--offload-dir) "
            "to a writable folder"
        )
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(
            f"offload dir {folder} is a file, not a folder; pass a folder to --offload-dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InvalidArgumentError(
            f"offload dir {folder} is not writable ({exc.strerror or exc}); pass a writable --offload-dir"
        ) from None
    return folder


def _file_name(prefix: str) -> str:
    return f"{prefix or 'root'}.safetensors"


class OffloadFolder:
    """Writes and reopens the per-layer files of one model's disk tier."""

    def __init__(self, folder: Path, key: dict[str, Any], units: dict[str, list[str]]) -> None:
        self.folder = folder
        self.key = key  # source checkpoint and dtype this folder was made from
        self.units = units  # layer prefix -> the tensor names it stores
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written: list[Path] = []

    def is_complete(self) -> bool:
        """Whether an earlier run already wrote this exact content."""
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (
            index.get("key") == self.key
            and index.get("units") == self.units
            and index.get("sizes") == self._sizes()
        )

    def _sizes(self) -> dict[str, int | None]:
        """Each layer file's size now (None: missing): a truncated or replaced file fails the match,
        and the folder is written again."""
        sizes: dict[str, int | None] = {}
        for prefix in self.units:
            file = self.folder / _file_name(prefix)
            sizes[file.name] = file.stat().st_size if file.is_file() else None
        return sizes

    def add(self, prefix: str, name: str, tensor: torch.Tensor) -> None:
        """Hold one tensor of a layer; write the layer's file once all of its tensors arrived."""
        layer = self.pending.setdefault(prefix, {})
        layer[name] = tensor.contiguous()
        if len(layer) == len(self.units[prefix]):
            self._write(prefix, self.pending.pop(prefix))

    def _write(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        final = self.folder / _file_name(prefix)
        tmp = final.with_name(final.name + ".tmp")
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.abort()
            raise InvalidArgumentError(
                f"cannot write offload file {final} ({exc.strerror or exc}); free disk space or pass "
                "another --offload-dir"
            ) from None
        self.written.append(final)

    def finish(self) -> None:
        """Write the index that marks the folder complete."""
        missing = sorted(self.pending)
        if missing:
            self.abort()
            raise InvalidArgumentError(f"the checkpoint lacks tensors of {missing[0]}; it is incomplete")
        index = {"key": self.key, "units": self.units, "sizes": self._sizes()}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))

    def abort(self) -> None:
        """Remove what this run wrote, so no half-written folder is left behind."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()
        self.pending.clear()

    def open(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by name, memory-mapped (the page cache holds them, not the process)."""
        out: dict[str, torch.Tensor] = {}
        for prefix in self.units:
            file = self.folder / _file_name(prefix)
            try:
                with safe_open(str(file), framework="pt") as handle:
                    out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(
                    f"offload file {file} is damaged ({' '.join(str(exc).split())}); delete {self.folder} "
                    "to have it written again"
                ) from None
        return out
