"""Passes run after loading: fuse projections, then move layers onto the native CPU kernels.

`fuse_projections` merges projections that read the same input: q/k/v into one matrix, gate/up
into another. Run after loading (parameters keep their HF names in checkpoints), like gpt-fast's
separate tensor-parallel pass. One larger mat-vec per token instead of three (two) saves kernel
launches and Python dispatch; the arithmetic is the same rows of the same weights.
`attach_native` (CPU models) repacks quantized layers for the native block kernel and attaches
the native float32 mat-vec and decoder layers; it lives here because it spans models and quant.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lamina.models.native_layer import attach_native_layers
from lamina.models.native_linear import attach_native_linears
from lamina.quant.int4 import Int4Linear
from lamina.quant.int8 import Int8Embedding, Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import NF4Linear

# Weights replaced between two calls of `release`: bounds what the allocator keeps, without paying
# a heap trim (~8 ms) for every small quantized layer.
RELEASE_EVERY_BYTES = 32 << 20


def fuse_projections(model: nn.Module, release: Callable[[], None] | None = None) -> int:
    """Fuse every module that offers `fuse()` (attention, gated MLP); returns how many fused.

    Layers that cannot merge (offloaded, mixed or unfusable quantization schemes) decline (their
    `fuse` returns False) and keep working unfused. `release` runs after every RELEASE_EVERY_BYTES
    of replaced weights and at the end, e.g. to hand the unfused matrices' pages back to the OS
    (otherwise the allocator keeps them and RSS grows by the size of every fused matrix).
    """
    fused = replaced = 0
    # only the fusing parents are listed: a list of every module would keep the replaced projections
    # (and their weights) alive until the end, ~40 MB of peak for the default model
    for module in [m for m in model.modules() if hasattr(m, "fuse")]:
        size = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        if module.fuse():
            fused, replaced = fused + 1, replaced + size
            if release is not None and replaced >= RELEASE_EVERY_BYTES:
                release()
                replaced = 0
    if release is not None and replaced:
        release()
    return fused


def attach_native(model: nn.Module) -> tuple[int, int]:
    """What `LLM.load` does for a CPU model once its layers are final (fused or not): int4, int8,
    LLM.int8, NF4 and FP4 layers repacked for the native block kernel, float linears onto the native
    mat-vec, then whole decoder layers onto the native layer where they qualify. Returns (linears,
    layers) attached."""
    shared = {id(m.weight_q) for m in model.modules() if isinstance(m, Int8Embedding)}
    for module in model.modules():
        if isinstance(module, (Int4Linear, NF4Linear, LLMInt8Linear)) or (
            isinstance(module, Int8Linear) and id(module.weight_q) not in shared
        ):
            module.use_native_blocks()  # an int8 head sharing its codes with the embedding stays
    return attach_native_linears(model), attach_native_layers(model)
