"""A GGUF under `max_memory` keeps its blocks: planned, offloaded and streamed at its stored size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lamina.api import LLM
from lamina.errors import CheckpointError
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty
from lamina.placement import load_and_dispatch
from lamina.placement.offload_store import LOCK
from lamina.placement.units import collect_units
from lamina.quant import blockq, gguf_stream
from lamina.quant.blockq import (
    FORMATS,
    KEPT_TYPES,
    TILE_BUFFERS,
    BlockQuantEmbedding,
    BlockQuantLinear,
    block_format,
    blockq_linear_from_gguf,
    empty_blocks,
)
from lamina.quant.gguf_stream import streamed_blocks
from tests.models.gguf_writer import KQUANT_SCALES, random_kquant
from tests.quant.test_gguf_convert import load_kept, write_mixed_gguf

MB = 2**20


@pytest.mark.parametrize("ggml_type", sorted(KEPT_TYPES))
def test_empty_blocks_have_the_tiles_a_layer_is_built_with(ggml_type: str) -> None:
    n, k = 32, 256
    bits, _, has_m, scale_block = FORMATS[block_format(ggml_type)]
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    d = torch.rand(n, k // scale_block)
    built = BlockQuantLinear.from_blocks(block_format(ggml_type), codes, d, d if has_m else None)
    empty = empty_blocks(ggml_type, (n, k))
    assert empty.ggml_type == built.ggml_type
    for name in TILE_BUFFERS:
        a, b = getattr(empty, name), getattr(built, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a.device.type, a.shape, a.dtype) == ("meta", b.shape, b.dtype), name


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_1", "Q6_K", "Q2_K"])
def test_tiles_built_by_rows_are_the_tiles_built_at_once(monkeypatch, ggml_type: str) -> None:
    shape, rng = (160, 256), np.random.default_rng(0)
    if ggml_type in KQUANT_SCALES:
        data = random_kquant(shape, ggml_type, rng)
    else:
        data = quants.quantize(rng.standard_normal(shape).astype(np.float32), GGMLQuantizationType[ggml_type])
    at_once = blockq_linear_from_gguf(data, ggml_type, shape)
    monkeypatch.setattr(blockq, "CHUNK_ROWS", 48)  # 160 rows: chunks of 48, 48, 48 and 16
    by_rows = blockq_linear_from_gguf(data, ggml_type, shape)
    for name in TILE_BUFFERS:
        a, b = getattr(by_rows, name), getattr(at_once, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_a_gguf_of_every_kept_type_streams_its_blocks(native_lib, tmp_path) -> None:
    path = write_mixed_gguf(tmp_path / "mixed.gguf", layers=4)
    in_memory = load_kept(path)
    with open_checkpoint(path) as checkpoint:
        model, _ = build_empty(checkpoint)
        reader = streamed_blocks(model, checkpoint, None, {"cpu": "1.5MB"}, torch.float32)
        # planned by tile bytes: the blocks' size, not float32's
        assert sum(u.nbytes for u in collect_units(model, dtype=torch.float32)) < 0.3 * _float_bytes(
            in_memory
        )
        load_and_dispatch(model, reader, max_memory={"cpu": "1.5MB"}, offload_dir=tmp_path / "off")
    model.eval()
    tiers = {p.prefix: p.tier for p in model.lamina_plan.placements}
    assert "disk" in tiers.values() and "cpu" in tiers.values(), tiers
    kinds = {name: type(m) for name, m in model.named_modules() if "proj" in name or name == "lm_head"}
    assert all(kind is BlockQuantLinear for kind in kinds.values()), kinds
    assert isinstance(model.input_embeddings(), BlockQuantEmbedding)
    written = sum(f.stat().st_size for f in (tmp_path / "off").glob("*.safetensors"))
    streamed = sum(p.nbytes for p in model.lamina_plan.placements if p.tier == "disk")
    assert streamed <= written <= streamed + 64 * 1024  # the tiles as they are, plus file headers
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), in_memory(ids))  # the same tiles through the same kernels


def _float_bytes(model: torch.nn.Module) -> int:
    return sum(4 * m.in_features * m.out_features for m in model.modules() if isinstance(m, BlockQuantLinear))


def test_the_default_model_under_a_cap_keeps_its_blocks_and_its_tokens(native_lib, tmp_path) -> None:
    resident = LLM.load(None)
    capped = LLM.load(None, max_memory={"cpu": "60MB"}, offload_dir=tmp_path)
    placed = capped.model.lamina_plan.totals()
    assert placed["cpu"] <= 60 * MB and sum(placed.values()) < 100 * MB  # 538 MB expanded to float32
    # the footprint reports the disk tier apart (it reported all 96.6 MB as resident on the cpu)
    footprint = capped.memory_footprint()
    assert footprint["cpu"] <= 60 * MB and footprint["disk"] > 30 * MB
    assert sum(footprint.values()) == resident.memory_footprint()["cpu"]
    prompt, greedy = "The capital of France is", {"max_new_tokens": 12, "temperature": 0}
    assert capped.generate(prompt, **greedy) == resident.generate(prompt, **greedy)


@pytest.mark.parametrize(
    ("quantize", "budgets"), [("none", {"cpu": 60 * MB}), (None, {"cpu": 60 * MB, "cuda:0": 2**30})]
)
def test_expanding_or_a_gpu_budget_keeps_the_float_path(monkeypatch, default_gguf, quantize, budgets) -> None:
    monkeypatch.setattr(gguf_stream, "parse_max_memory", lambda spec: budgets)  # as parsed on a GPU machine
    with open_checkpoint(default_gguf) as checkpoint:
        model, _ = build_empty(checkpoint)
        assert gguf_stream.streamed_blocks(model, checkpoint, quantize, "given", torch.float32) is None
    assert not any(isinstance(m, BlockQuantLinear | BlockQuantEmbedding) for m in model.modules())


def test_a_tensor_whose_scales_do_not_fit_the_blocks_is_named(monkeypatch, default_gguf, tmp_path) -> None:
    """The plan is made before any tensor is converted: one that turns out not to fit fails by name."""
    monkeypatch.setattr(gguf_stream, "blockq_linear_from_gguf", lambda *args: None)  # scales beyond fp16
    with open_checkpoint(default_gguf) as checkpoint:
        model, _ = build_empty(checkpoint)
        reader = streamed_blocks(model, checkpoint, None, {"cpu": "60MB"}, torch.float32)
        with pytest.raises(
            CheckpointError, match=r"model\.embed_tokens\.weight \(Q8_0\) has scales beyond fp16"
        ):
            load_and_dispatch(model, reader, max_memory={"cpu": "60MB"}, offload_dir=tmp_path)
    # no offload file left that a later run could take as complete (the folder's lock file stays)
    assert {p.name for p in tmp_path.iterdir()} <= {LOCK}
