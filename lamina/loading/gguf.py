"""GGUF files (llama.cpp's format), read with the `gguf` package over a memory map.

The metadata becomes an HF-style config dict and llama.cpp's tensor names become HF parameter
names, so the rest of Lamina treats a GGUF like any other checkpoint. `read` dequantizes one tensor
to float32 and undoes what llama.cpp's converter changed (see `GGUFArchitecture.to_hf_layout`).
`read_raw` returns the stored blocks for code that keeps weights quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.loading.checkpoint import Checkpoint
from lamina.loading.gguf_names import GGUF_ARCHITECTURES, hf_config_from_gguf


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: GGML type name, logical shape (HF order) and the bytes/elements."""

    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFCheckpoint(Checkpoint):
    """A .gguf file: metadata as an HF config, tensors by HF name."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
            raise CheckpointError(f"{path} is not a valid GGUF file, truncated or corrupt ({exc})") from None
        self.metadata = {name: _field_value(f) for name, f in self.reader.fields.items()}
        arch = self.metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            supported = ", ".join(sorted(GGUF_ARCHITECTURES))
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} in {path.name} is not supported; supported: {supported}"
            )
        self.architecture = arch
        self.spec = GGUF_ARCHITECTURES[arch]
        self._tensors = {self.spec.hf_tensor_name(t.name): t for t in self.reader.tensors}
        self.config = hf_config_from_gguf(self.metadata, arch, tied="lm_head.weight" not in self._tensors)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def read_raw(self, name: str) -> RawTensor:
        """The stored blocks of one tensor (no dequantization, no layout fixes: see GGUFArchitecture)."""
        t = self._tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return RawTensor(t.tensor_type.name, shape, t.data)

    def stored_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

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
                tensor = _dequantize_by_rows(raw.data, self._tensor(name).tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(
                f"cannot dequantize {name} ({raw.ggml_type}) from {self.path.name}: {exc}"
            ) from None
        return self.spec.to_hf_layout(name, tensor.reshape(raw.shape), self.config)

    def close(self) -> None:
        self._tensors.clear()

    def _tensor(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path.name} has no tensor for {name!r}")
        return t


DEQUANT_ROWS_BYTES = 8 << 20  # float32 output per dequantization step


def _dequantize_by_rows(blocks: np.ndarray, qtype: Any) -> torch.Tensor:
    """Dequantize [rows, bytes] blocks to float32 [rows, cols] a few MB at a time.

    `gguf.quants.dequantize` makes several full-size float temporaries; on a large matrix (the
    embedding) that would briefly double the memory a load needs.
    """
    import gguf

    first = gguf.quants.dequantize(blocks[:1], qtype)
    cols = first.shape[-1]
    out = torch.empty(blocks.shape[0], cols, dtype=torch.float32)
    step = max(1, DEQUANT_ROWS_BYTES // (4 * cols))
    for start in range(0, blocks.shape[0], step):
        rows = gguf.quants.dequantize(blocks[start : start + step], qtype)
        out[start : start + step] = torch.from_numpy(rows.reshape(-1, cols))
    return out


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
