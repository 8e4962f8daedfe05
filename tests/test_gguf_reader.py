"""The lean GGUF parser and torch dequantizer agree exactly with the `gguf` package's reader."""

from __future__ import annotations

import os
import re

import gguf
import numpy as np
import torch

from lamina import LLM
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.gguf import GGUFCheckpoint
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


def _resident_kib_of(path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_released_pages_leave_resident_memory_and_read_back_the_same(default_gguf):
    """A load copies every tensor into its runtime layout; releasing the file's pages keeps them from
    doubling its peak (98 MB for the default model)."""
    with open_checkpoint(default_gguf) as checkpoint:
        name = checkpoint.tensor_names()[0]
        first = checkpoint.read_raw(name).data.copy()
        for each in checkpoint.tensor_names():
            checkpoint.read_raw(each).data.sum()  # touch every page
        before = _resident_kib_of(default_gguf)
        checkpoint.release_pages()
        after = _resident_kib_of(default_gguf)
        assert np.array_equal(checkpoint.read_raw(name).data, first)  # mapped back in on the next read
    assert before > 80_000 and after < 1_000, (before, after)


def test_loading_releases_the_file_pages_as_it_goes(default_gguf, monkeypatch):
    calls = []
    release = GGUFCheckpoint.release_pages
    monkeypatch.setattr(GGUFCheckpoint, "release_pages", lambda self: calls.append(1) or release(self))
    LLM.load(default_gguf, device="cpu")
    assert len(calls) > 210 // 8  # 210 linears claimed as blocks: a release every 8, and one at the end
