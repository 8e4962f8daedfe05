"""GGUF files (llama.cpp's format), read over a memory map with a lean header parser.

The metadata becomes an HF-style config dict and llama.cpp's tensor names become HF parameter
names, so the rest of Lamina treats a GGUF like any other checkpoint. `read` dequantizes one tensor
to float32 and undoes what llama.cpp's converter changed (see `GGUFArchitecture.to_hf_layout`).
`read_raw` returns the stored blocks for code that keeps weights quantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.loading.checkpoint import Checkpoint
from lamina.loading.gguf_dequant import dequantize
from lamina.loading.gguf_header import TensorEntry, read_gguf, unmap_file_pages
from lamina.loading.gguf_names import GGUF_ARCHITECTURES, ROPE_FACTOR_TENSORS, hf_config_from_gguf


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: GGML type name, logical shape (HF order) and the bytes/elements."""

    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFCheckpoint(Checkpoint):
    """A .gguf file: metadata as an HF config, tensors by HF name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.metadata, tensors = read_gguf(path)
        except Exception as exc:  # the parser raises ValueError/IndexError/struct errors on bad bytes
            raise CheckpointError(
                f"{path} is not a valid GGUF file, truncated or corrupt ({exc}); re-download it"
            ) from None
        arch = self.metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            supported = ", ".join(sorted(GGUF_ARCHITECTURES))
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} in {path.name} is not supported; supported: {supported}"
            )
        self.architecture = arch
        self.spec = GGUF_ARCHITECTURES[arch].for_file(tensors)
        # LongRoPE factors are HF config values: read them now, and they are not weights
        rope_factors = {
            key: _vector(tensors.pop(name)) for name, key in ROPE_FACTOR_TENSORS.items() if name in tensors
        }
        self.config = hf_config_from_gguf(self.metadata, self.spec, tensors, rope_factors)
        self._tensors = dict(self._by_hf_name(tensors))

    def _by_hf_name(self, tensors: dict[str, TensorEntry]) -> Iterator[tuple[str, TensorEntry]]:
        """The file's tensors under HF names; a fused q/k/v the HF model keeps apart becomes 3 row views."""
        for name, t in tensors.items():
            parts = self.spec.split_rows(name, t.dims[-1], self.config)
            if parts is None:
                yield self.spec.hf_tensor_name(name), t
            else:
                yield from ((hf_name, _rows(t, start, end)) for hf_name, start, end in parts)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def read_raw(self, name: str) -> RawTensor:
        """The stored blocks of one tensor (no dequantization, no layout fixes: see GGUFArchitecture)."""
        t = self._tensor(name)
        return RawTensor(t.ggml_type.name, tuple(reversed(t.dims)), t.data)

    def stored_type(self, name: str) -> str:
        return self._tensor(name).ggml_type.name

    def read(self, name: str) -> torch.Tensor:
        raw = self.read_raw(name)
        try:
            if raw.ggml_type == "BF16":
                # gguf exposes BF16 as raw 16-bit words; reinterpret them.
                array = np.ascontiguousarray(raw.data).view(np.int16)
                tensor = torch.from_numpy(array.copy()).view(torch.bfloat16).float()
            elif raw.ggml_type in ("F32", "F16"):
                tensor = torch.from_numpy(np.array(raw.data, dtype=np.float32))
            else:
                tensor = _dequantize_by_rows(raw.data, self._tensor(name).ggml_type, raw.shape[-1])
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(
                f"cannot dequantize {name} ({raw.ggml_type}) from {self.path.name}: {exc}"
            ) from None
        return self.spec.to_hf_layout(name, tensor.reshape(raw.shape), self.config)

    def close(self) -> None:
        self._tensors.clear()

    def release_pages(self) -> None:
        if self._tensors:  # every tensor is a view of one mapping of the file
            unmap_file_pages(next(iter(self._tensors.values())).data)

    def _tensor(self, name: str) -> TensorEntry:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path.name} has no tensor for {name!r}")
        return t


def _rows(t: TensorEntry, start: int, end: int) -> TensorEntry:
    """Rows start..end of a tensor, as a view (quantized blocks never straddle rows)."""
    return TensorEntry(t.name, t.ggml_type, (*t.dims[:-1], end - start), t.data[start:end])


def _vector(t: TensorEntry) -> list[float]:
    """A small float tensor (F32/F16) as a list."""
    if t.ggml_type.name not in ("F32", "F16"):
        raise CheckpointError(f"{t.name} is stored as {t.ggml_type.name}; llama.cpp writes it as F32")
    return np.asarray(t.data, dtype=np.float32).reshape(-1).tolist()


# float32 output per dequantization step. Each step makes a few temporaries of this size, which
# the allocator keeps around: 8 MB steps put 72 MB above the 113 MB embedding at its peak, 1 MB
# steps 3.5 MB (and dequantize it faster, 62 vs 101 ms: the temporaries stay in cache).
DEQUANT_ROWS_BYTES = 1 << 20


def _dequantize_by_rows(blocks: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> torch.Tensor:
    """Dequantize [rows, bytes] blocks to float32 [rows, cols] a few MB at a time.

    Dequantizing makes several full-size temporaries; on a large matrix (the embedding) that would
    briefly double the memory a load needs. Q4_0/Q4_1/Q8_0 use torch (fast, multi-threaded), the
    rest `gguf.quants`.
    """
    import gguf

    blocks = blocks.reshape(-1, blocks.shape[-1])  # [..., row bytes] -> [rows, row bytes]
    out = torch.empty(blocks.shape[0], cols, dtype=torch.float32)
    step = max(1, DEQUANT_ROWS_BYTES // (4 * cols))
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step]
        rows = dequantize(chunk, qtype.name)
        if rows is None:
            rows = torch.from_numpy(gguf.quants.dequantize(chunk, qtype))
        out[start : start + step] = rows.reshape(-1, cols)  # [n * cols] -> [n, cols]
    return out
