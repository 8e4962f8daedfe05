"""Fuse projections that read the same input: q/k/v into one matrix, gate/up into another.

Run after loading (parameters keep their HF names in checkpoints), like gpt-fast's separate
tensor-parallel pass. One larger mat-vec per token instead of three (two) saves kernel launches
and Python dispatch; the arithmetic is the same rows of the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def fuse_projections(model: nn.Module, after_each: Callable[[], None] | None = None) -> int:
    """Fuse every module that offers `fuse()` (attention, gated MLP); returns how many fused.

    Layers that cannot merge (offloaded, mixed or unfusable quantization schemes) decline (their
    `fuse` returns False) and keep working unfused.
    `after_each` runs after each fusion, e.g. to hand the unfused matrices' pages back to the OS
    before the next layer allocates (otherwise the allocator keeps them and RSS grows by the
    size of every fused matrix).
    """
    fused = 0
    for module in list(model.modules()):
        if hasattr(module, "fuse") and module.fuse():
            fused += 1
            if after_each is not None:
                after_each()
    return fused
