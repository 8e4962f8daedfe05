"""The lean GGUF parser and torch dequantizer agree exactly with the `gguf` package's reader."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lamina.loading.gguf_dequant import dequantize
from lamina.loading.gguf_header import read_gguf


def _reference_metadata(reader: gguf.GGUFReader) -> dict:
    values = {}
    for name, field in reader.fields.items():
        value = field.contents()
        values[name] = value.tolist() if isinstance(value, np.ndarray) else value
    return values


def test_metadata_and_tensor_views_match_gguf_reader(default_gguf):
    reader = gguf.GGUFReader(str(default_gguf))
    metadata, tensors = read_gguf(default_gguf)
    assert metadata == _reference_metadata(reader)
    assert [t.name for t in reader.tensors] == list(tensors)
    for ref in reader.tensors:
        mine = tensors[ref.name]
        assert mine.ggml_type == ref.tensor_type
        assert mine.dims == tuple(ref.shape.tolist())
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape
        assert np.array_equal(mine.data, ref.data)


def test_torch_dequantize_is_bit_identical(default_gguf):
    _, tensors = read_gguf(default_gguf)
    by_type = {}
    for t in tensors.values():
        by_type.setdefault(t.ggml_type.name, t)
    checked = 0
    for name, t in by_type.items():
        mine = dequantize(t.data, name)
        if mine is None:
            continue
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.ggml_type)).reshape(-1)
        assert torch.equal(mine, ref), name
        checked += 1
    assert checked >= 2  # Q4_1 and Q8_0 in the default model


def test_q4_0_matches_reference():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(dequantize(blocks, "Q4_0"), torch.from_numpy(ref).reshape(-1))
