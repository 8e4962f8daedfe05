"""A lean GGUF header parser: metadata and tensor directory, with tensor data left on disk.

`gguf.GGUFReader` builds a numpy view for every part of every field, which costs seconds for the
~100k tokenizer strings of a typical file. This parser walks the header once with `struct` (the
same layout, spelled by the `gguf` package's constants) and memory-maps the data section, so
opening a file costs milliseconds and tensor bytes are read only when asked for.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf.constants import GGUFValueType as V

# Scalar value types -> struct format (little-endian).
_SCALARS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}
# Array element types read in one go with numpy.
_NUMPY = {
    V.UINT8: np.uint8,
    V.INT8: np.int8,
    V.UINT16: np.uint16,
    V.INT16: np.int16,
    V.UINT32: np.uint32,
    V.INT32: np.int32,
    V.FLOAT32: np.float32,
    V.BOOL: np.bool_,
    V.UINT64: np.uint64,
    V.INT64: np.int64,
    V.FLOAT64: np.float64,
}
# Tensor types numpy can hold directly; any other (quantized, BF16) is exposed as raw bytes.
_PLAIN_TENSOR_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the directory: GGML type, dims in GGUF order (fastest first), data view."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    data: np.ndarray  # as gguf.GGUFReader exposes it: typed for plain types, uint8 rows otherwise


class _Cursor:
    """Reads little-endian values from a buffer, advancing an offset."""

    def __init__(self, buffer: memoryview) -> None:
        self.buf, self.pos = buffer, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = bytes(self.buf[self.pos : self.pos + length])
        if len(raw) != length:
            raise ValueError("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = V(vtype)
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            return self.array()
        return self.scalar(_SCALARS[vtype])

    def array(self) -> list[Any]:
        item_type, count = V(self.scalar("<I")), self.scalar("<Q")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item_type) for _ in range(count)]


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
    """Metadata (with GGUF.version/tensor_count/kv_count, as gguf.GGUFReader reports them) and tensors.

    Raises ValueError (or struct.error / IndexError) on a file that is not valid GGUF.
    """
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mapped))
    if cur.scalar("<I") != GGUF_MAGIC:
        raise ValueError("bad magic (not a GGUF file)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": tensor_count,
        "GGUF.kv_count": kv_count,
    }
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    directory = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        directory.append((name, GGMLQuantizationType(cur.scalar("<I")), dims, cur.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, ggml_type, dims, offset in directory:
        if name in tensors:
            raise ValueError(f"duplicated tensor {name!r}")
        tensors[name] = TensorEntry(
            name, ggml_type, dims, _tensor_view(mapped, data_start + offset, ggml_type, dims)
        )
    return metadata, tensors


def unmap_file_pages(view: np.ndarray) -> None:
    """Drop this process's mapping of the pages of the file `view` lies in (MADV_DONTNEED over the whole
    read-only mapping). They stay in the page cache and map back in on the next read, but no longer
    count in this process's resident memory: a load copies every tensor into its runtime layout, so
    the file's pages would otherwise double its peak (98 MB more for the default model)."""
    base = view
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)  # a view -> the np.memmap -> its mmap
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):  # Linux and macOS
        base.madvise(mmap.MADV_DONTNEED)


def _tensor_view(
    mapped: np.ndarray, start: int, ggml_type: GGMLQuantizationType, dims: tuple[int, ...]
) -> np.ndarray:
    """The tensor's bytes as a zero-copy view, shaped [dims reversed] (quantized: [rows, row bytes])."""
    shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dim first
    n_elems = int(np.prod(dims, dtype=np.int64))
    if ggml_type in _PLAIN_TENSOR_TYPES:
        dtype = np.dtype(_PLAIN_TENSOR_TYPES[ggml_type])
        n_bytes = n_elems * dtype.itemsize
    else:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        dtype = np.dtype(np.uint8)
        n_bytes = n_elems // block_size * type_size
        shape = (*shape[:-1], shape[-1] // block_size * type_size)  # [..., row elems] -> [..., row bytes]
    if start + n_bytes > mapped.size:
        raise ValueError("tensor data runs past the end of the file (truncated?)")
    return mapped[start : start + n_bytes].view(dtype).reshape(shape)
