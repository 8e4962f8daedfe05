"""Placement units: the pieces of a model the planner moves between tiers as one.

A unit is a no-split module (a decoder layer) or a leaf module, taken whole; a module that has its
own tensors and also children contributes a unit holding only its direct tensors. Units come in
module order, which for a stack of layers is execution order, so prefetching "the next unit" is
prefetching what runs next. Units sharing a tensor (tied embeddings) form one group that is always
placed together.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from lamina.placement.memory import tensor_nbytes


@dataclass
class Unit:
    """One placeable piece: `prefix` names the module; `whole` says whether it includes children."""

    prefix: str
    module: nn.Module
    whole: bool
    names: list[str] = field(default_factory=list)  # full tensor names, aliases included
    nbytes: int = 0  # bytes of tensors first seen in this unit (a tied tensor counts once)


def join(prefix: str, name: str) -> str:
    """`model.layers` + `0` -> `model.layers.0`; an empty part (the root) adds nothing."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def is_no_split(module: nn.Module, no_split: Collection[str | type]) -> bool:
    """Whether `module` is an instance of a class named (or given) in `no_split`."""
    return any(
        type(module).__name__ == cls if isinstance(cls, str) else isinstance(module, cls) for cls in no_split
    )


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def collect_units(
    model: nn.Module, no_split: Collection[str | type] = (), dtype: torch.dtype | None = None
) -> list[Unit]:
    """The model's units in module order, each with its tensor names and byte size in `dtype`."""
    units: list[Unit] = []

    def walk(module: nn.Module, prefix: str) -> None:
        children = [(n, c) for n, c in module.named_children() if _has_tensors(c)]
        if not children or is_no_split(module, no_split):
            units.append(Unit(prefix, module, whole=True))
            return
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            units.append(Unit(prefix, module, whole=False))
        for name, child in children:
            walk(child, join(prefix, name))

    walk(model, "")
    seen: set[int] = set()
    for unit in units:
        tensors = list(unit.module.named_parameters(recurse=unit.whole, remove_duplicate=False))
        tensors += list(unit.module.named_buffers(recurse=unit.whole, remove_duplicate=False))
        for name, tensor in tensors:
            unit.names.append(join(unit.prefix, name))
            if id(tensor) not in seen:
                seen.add(id(tensor))
                unit.nbytes += tensor_nbytes(tensor, dtype)
    return units


def tie_groups(units: list[Unit]) -> list[list[int]]:
    """Indices of units that share a tensor, merged into groups, ordered by first unit."""
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for index, unit in enumerate(units):
        tensors = [*unit.module.parameters(recurse=unit.whole), *unit.module.buffers(recurse=unit.whole)]
        for tensor in tensors:
            first = owner.setdefault(id(tensor), index)
            parent[find(index)] = find(first)
    groups: dict[int, list[int]] = {}
    for index in range(len(units)):
        groups.setdefault(find(index), []).append(index)
    return sorted(groups.values(), key=lambda g: g[0])
