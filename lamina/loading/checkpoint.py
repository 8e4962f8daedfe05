"""One entry point for every checkpoint format: `open_checkpoint(path) -> Checkpoint`.

A `Checkpoint` knows its model config (as a Hugging Face config dict) and its tensors by Hugging
Face parameter name, and reads one tensor at a time, so a loader never holds a full state dict.
The formats live in their own modules; this one decides which applies to a path.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from lamina.errors import CheckpointError


class Checkpoint(ABC):
    """Tensors by HF name plus the HF-style config dict that describes the model."""

    path: Path
    config: dict[str, Any]

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Every tensor the checkpoint holds, by HF parameter name."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor on the CPU, in its stored dtype (GGUF blocks are dequantized to float32)."""

    @abstractmethod
    def stored_type(self, name: str) -> str:
        """How a tensor is stored, without reading it: a dtype ("F32", "BF16") or a GGML type ("Q4_1")."""

    @abstractmethod
    def close(self) -> None:
        """Release file handles and maps; reading afterwards is an error."""

    @abstractmethod
    def release_pages(self) -> None:
        """Hint that what was read so far is copied elsewhere: a mapped file's pages may leave this
        process's resident memory (reading again maps them back)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError that says which file is broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF model directory (safetensors, sharded or not, or pytorch_model.bin) or a .gguf file."""
    from lamina.loading.gguf import GGUFCheckpoint
    from lamina.loading.hf_dir import HFDirectoryCheckpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; pass an HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return GGUFCheckpoint(path)
        if path.name == "config.json" or path.suffix in {".safetensors", ".json", ".bin"}:
            if not (path.parent / "config.json").is_file():
                raise CheckpointError(
                    f"{path.name} has no config.json beside it; pass the HF model directory that holds both"
                )
            return HFDirectoryCheckpoint(path.parent)
        raise CheckpointError(f"{path} is neither a .gguf file nor part of an HF model directory")
    if (path / "config.json").is_file():
        return HFDirectoryCheckpoint(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFCheckpoint(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise CheckpointError(f"{path} holds several .gguf files ({names}); pass one of them")
    raise CheckpointError(
        f"{path} is not a model directory (no config.json and no .gguf file); "
        "pass an HF model directory or a .gguf file"
    )


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
