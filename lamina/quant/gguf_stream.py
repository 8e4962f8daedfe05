"""A GGUF placed and streamed under `max_memory` with its blocks kept, at its stored size.

Without this a GGUF under `max_memory` is expanded to float32 (4-8x its file size) before it is
planned, written to the offload folder and streamed. Instead, `plan_gguf_blocks` turns every module
the in-memory load would build from blocks on the native kernel (`load.StoredWeights`: linears and
the token embedding in a `KEPT_TYPES` type) into an empty `BlockQuantLinear` (or
`BlockQuantEmbedding`) on the meta device, shaped for its tiles, so `plan` sizes each layer by its
tile bytes. The returned `BlockTensors` is the checkpoint as `load_and_dispatch` reads it: the
tiles of each such module, built from the file's bytes when first asked for (one module at a time),
and every other tensor as the checkpoint gives it. The placement loader keeps the tiles' dtypes
(uint8 codes, int16 scale bits), so resident, offloaded and streamed layers all hold the blocks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lamina.errors import CheckpointError
from lamina.heap import release_free_heap
from lamina.loading.checkpoint import Checkpoint
from lamina.loading.gguf import GGUFCheckpoint
from lamina.placement.memory import parse_max_memory
from lamina.quant.apply import set_submodule
from lamina.quant.blockq import (
    FORMATS,
    KEPT_TYPES,
    TILE_BUFFERS,
    BlockQuantEmbedding,
    BlockQuantLinear,
    block_format,
    blockq_linear_from_gguf,
    empty_blocks,
    runs_natively,
)
from lamina.quant.load import StoredWeights


class BlockTensors:
    """A GGUF checkpoint read by module state names, with the planned modules' tiles built on demand."""

    def __init__(self, checkpoint: GGUFCheckpoint, planned: dict[str, str], embedding: str | None) -> None:
        """`planned`: module name -> the stored weight its tiles are built from; `embedding`: the
        token embedding's module name if planned (its rows are tokens, never reordered)."""
        self.checkpoint, self.planned, self.embedding = checkpoint, planned, embedding
        self.path = checkpoint.path
        self._built: tuple[str, BlockQuantLinear, set[str]] | None = None  # module, its tiles, unread

    def tensor_names(self) -> list[str]:
        """The checkpoint's names, each planned weight replaced by its module's tile names."""
        sources = {weight: module for module, weight in self.planned.items()}
        names = []
        for name in self.checkpoint.tensor_names():
            module = sources.get(name)
            if module is None:
                names.append(name)
                continue
            ggml_type = self.checkpoint.stored_type(name)
            has_m = FORMATS[block_format(ggml_type)][2]
            names += [f"{module}.{buffer}" for buffer in TILE_BUFFERS if has_m or buffer != "m_tiled"]
        return names

    def read(self, name: str) -> torch.Tensor:
        module, _, buffer = name.rpartition(".")
        if module not in self.planned or buffer not in TILE_BUFFERS:
            return self.checkpoint.read(name)
        if self._built is None or self._built[0] != module:
            release_free_heap()  # the previous module's conversion temporaries, before the next's
            layer = self._build(module)
            self._built = module, layer, {b for b in TILE_BUFFERS if getattr(layer, b) is not None}
        _, layer, unread = self._built
        unread.discard(buffer)
        if not unread:  # the loader holds what it keeps: don't pin a streamed layer's tiles here
            self._built = None
        return getattr(layer, buffer)

    def _build(self, module: str) -> BlockQuantLinear:
        weight, spec, config = self.planned[module], self.checkpoint.spec, self.checkpoint.config
        raw = self.checkpoint.read_raw(weight)
        order = None if module == self.embedding else spec.row_order(weight, config)
        layer = blockq_linear_from_gguf(raw.data, raw.ggml_type, raw.shape, order)
        if layer is None:
            raise CheckpointError(
                f"{weight} ({raw.ggml_type}) has scales beyond fp16 and cannot stream as blocks; "
                "load it with --quantize none"
            )
        return layer


def plan_gguf_blocks(model: nn.Module, checkpoint: GGUFCheckpoint, dtype: torch.dtype) -> BlockTensors | None:
    """Make the modules a GGUF's blocks can build empty blocks of their tile shapes (meta); the reader
    for `load_and_dispatch`, or None when none qualifies (no native kernel here, float weights).
    `dtype`: the activation dtype the embedding returns."""
    stored = StoredWeights(model, checkpoint)
    planned: dict[str, str] = {}
    embedding = None
    cpu = torch.device("cpu")
    for name, module in list(model.named_modules()):
        raw = stored.raw(name, module)
        if raw is None or raw.ggml_type not in KEPT_TYPES or not runs_natively(cpu, raw.shape):
            continue
        layer = empty_blocks(raw.ggml_type, raw.shape)
        if module is stored.embed:
            embedding, table = name, BlockQuantEmbedding(layer)
            table.output_dtype = dtype
            set_submodule(model, name, table)
            head = stored.tied_head_name()
            if head is not None:
                set_submodule(model, head, layer)
        else:
            set_submodule(model, name, layer)
        planned[name] = f"{name}.weight"
    return BlockTensors(checkpoint, planned, embedding) if planned else None


def streamed_blocks(
    model: nn.Module,
    checkpoint: Checkpoint,
    quantize: str | None,
    max_memory: str | Mapping[str, str | int | float],
    dtype: torch.dtype,
) -> BlockTensors | None:
    """`plan_gguf_blocks` where it applies: a GGUF loaded without `quantize` within budgets that are
    all CPU RAM or disk (the block kernel runs on the CPU); None otherwise (the float path)."""
    budgets = parse_max_memory(max_memory) or {}
    if quantize is not None or not isinstance(checkpoint, GGUFCheckpoint):
        return None
    if any(tier.startswith("cuda") for tier in budgets):
        return None
    return plan_gguf_blocks(model, checkpoint, dtype)
