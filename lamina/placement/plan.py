"""The planner: which unit of a model lives on which tier (`cuda:N`, `cpu`, `disk`).

Tiers are filled fastest first, in module order, so each tier holds a contiguous run of layers.
Layers that do not stay resident on the compute device are streamed to it while the previous layer
computes, so the planner keeps room there for `prefetch + 1` of the largest such layer. The plan
is plain data: it can be printed, inspected, edited and handed to `load_and_dispatch`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lamina.errors import InvalidArgumentError, LaminaError
from lamina.placement.memory import default_max_memory, format_size, parse_max_memory
from lamina.placement.units import Unit, collect_units, tie_groups

STRATEGIES = ("auto", "balanced", "sequential")
DEFAULT_PREFETCH = 1
#: The dtypes weights can run in under a plan, by the names `load_and_dispatch` and `plan` accept.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlacementError(LaminaError):
    """The model cannot be placed under the memory budget given."""


@dataclass(frozen=True)
class Placement:
    """One unit's tier; `whole` is False for a module's own tensors without its children."""

    prefix: str
    tier: str
    nbytes: int
    kind: str
    whole: bool = True


@dataclass
class Plan:
    """A device map plus what it was planned for: budgets, compute device, stream buffers."""

    placements: list[Placement]
    compute_device: str
    budgets: dict[str, int]
    reserved: int = 0  # bytes kept on the compute device for streamed layers
    prefetch: int = DEFAULT_PREFETCH
    _by_prefix: dict[str, Placement] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_prefix = {p.prefix: p for p in self.placements}

    @property
    def device_map(self) -> dict[str, str]:
        """`{module prefix: tier}` as Accelerate users know it."""
        return {p.prefix: p.tier for p in self.placements}

    def execution_device(self, tier: str) -> str:
        """Where a unit on `tier` computes: its own GPU, else the compute device (streamed)."""
        return tier if tier.startswith("cuda") else self.compute_device

    @property
    def on_cpu(self) -> bool:
        """Whether the computation runs on the CPU (no GPU in the plan)."""
        return self.compute_device == "cpu"

    def is_streamed(self, tier: str) -> bool:
        """Whether units on `tier` are streamed in per use instead of staying resident."""
        return tier == "disk" or (tier == "cpu" and not self.on_cpu)

    def totals(self) -> dict[str, int]:
        """Bytes on each tier, in tier order."""
        out = {tier: 0 for tier in self.budgets}
        for p in self.placements:
            out[p.tier] = out.get(p.tier, 0) + p.nbytes
        return out

    @property
    def stream_buffers(self) -> int:
        """How many buffers the streamer keeps: `prefetch + 1`, at most one per streamed unit (a
        larger prefetch reads every streamed unit ahead; see `stream_buffer_count`)."""
        streamed = sum(1 for p in self.placements if self.is_streamed(p.tier))
        return stream_buffer_count(self.prefetch, streamed)

    def streamed_bytes(self) -> dict[str, int]:
        """Bytes streamed per forward pass from each offload tier."""
        return {t: n for t, n in self.totals().items() if self.is_streamed(t) and n}

    def __str__(self) -> str:
        width = max(
            [len("module"), *(len(p.prefix or "(root)") + (0 if p.whole else 9) for p in self.placements)]
        )
        lines = [f"{'module':<{width}}  {'kind':<22} {'tier':<7} {'size':>10}"]
        for p in self.placements:
            name = (p.prefix or "(root)") + ("" if p.whole else " (own)")
            lines.append(f"{name:<{width}}  {p.kind[:22]:<22} {p.tier:<7} {format_size(p.nbytes):>10}")
        lines.append("")
        lines.append(f"{'tier':<7} {'placed':>10} {'budget':>10}  use")
        for tier, total in self.totals().items():
            budget = self.budgets.get(tier)
            limit = "unlimited" if budget is None or budget == math.inf else format_size(int(budget))
            use = "streamed per token" if self.is_streamed(tier) else "resident"
            if tier == self.compute_device and self.reserved:
                use += f", +{format_size(self.reserved)} for {self.stream_buffers} stream buffers"
            lines.append(f"{tier:<7} {format_size(total):>10} {limit:>10}  {use}")
        return "\n".join(lines)


def stream_buffer_count(prefetch: int, streamed: int) -> int:
    """Buffers for `streamed` units read `prefetch` ahead: `prefetch + 1`, but never more than the
    units themselves (as the streamers allocate them); 0 when nothing is streamed."""
    return min(prefetch, streamed - 1) + 1 if streamed else 0


def to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bfloat16"` or `torch.bfloat16` -> `torch.bfloat16`; None keeps each tensor's stored dtype.

    Only the dtypes weights run in (`DTYPES`) are accepted; anything else is a one-line error.
    """
    if dtype is None:
        return None
    names = ", ".join(DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidArgumentError(f"dtype {dtype} cannot be used here; weights run in one of {names}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use one of {names} (a string or a torch.dtype)")
    return DTYPES[dtype]


def check_model(model: Any, function: str) -> nn.Module:
    """`model` itself if it is an `nn.Module`; a one-line error naming `function` otherwise."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{function} needs the model as an nn.Module (built under lamina.init_empty()), "
            f"got {type(model).__name__}"
        )
    return model


def check_prefetch(prefetch: Any) -> int:
    """`prefetch` as an int >= 0; a one-line error otherwise (1.5, "1", True, -1)."""
    try:
        if isinstance(prefetch, bool):
            raise TypeError
        value = operator.index(prefetch)
    except TypeError:
        raise InvalidArgumentError(
            f"prefetch must be a whole number of layers (0 or more), got {prefetch!r}"
        ) from None
    if value < 0:
        raise InvalidArgumentError(f"prefetch must be 0 or more layers, got {value}")
    return value


def check_no_split(no_split: Any) -> tuple[str | type, ...]:
    """`no_split` as a tuple of class names and classes (a single one is taken as a list of one)."""
    if isinstance(no_split, str | type):
        return (no_split,)
    try:
        items = tuple(no_split)
    except TypeError:
        items = None
    if items is None or not all(isinstance(item, str | type) for item in items):
        bad = no_split if items is None else next(i for i in items if not isinstance(i, str | type))
        raise InvalidArgumentError(
            f"no_split must list module class names or classes (e.g. ['LlamaDecoderLayer']), got {bad!r}"
        )
    return items


def tier_order(budgets: Mapping[str, float]) -> list[str]:
    """GPUs by index, then cpu, then disk."""
    gpus = sorted((t for t in budgets if t.startswith("cuda")), key=lambda t: int(t.split(":")[1]))
    return [*gpus, *(t for t in ("cpu", "disk") if t in budgets)]


def plan(
    model: nn.Module,
    max_memory: str | Mapping[str, str | int | float] | None = None,
    no_split: Collection[str | type] | None = None,
    strategy: str = "auto",
    dtype: torch.dtype | None = None,
    prefetch: int = DEFAULT_PREFETCH,
) -> Plan:
    """Place `model`'s units on tiers under `max_memory` (`{"cuda:0": "2GiB", "cpu": "4GiB"}`).

    Devices left out of `max_memory` are not used, except `disk`, which is unlimited unless given.
    `no_split` names module classes never divided between tiers (default: the model's own
    `no_split_modules`). `dtype` (`"float32"`, `"bfloat16"`, `"float16"` or the torch dtype) sizes
    floating tensors as they will run. `strategy`: `sequential` fills each GPU before the next;
    `balanced` spreads layers evenly over GPUs; `auto` is balanced with several GPUs and sequential
    otherwise. `prefetch` is how many streamed units are read ahead of the one computing; room for
    `prefetch + 1` of the largest is kept on the compute device. A prefetch at least as large as the
    number of streamed units reads all of them ahead and needs one buffer per streamed unit, no
    more: a larger number is capped there, as the streamers cap it.
    """
    check_model(model, "plan")
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown placement strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    prefetch = check_prefetch(prefetch)
    dtype = to_dtype(dtype)
    parsed = parse_max_memory(max_memory) if max_memory is not None else default_max_memory()
    budgets: dict[str, float] = {t: float(n) for t, n in parsed.items()}
    budgets.setdefault("disk", math.inf)
    tiers = tier_order(budgets)
    gpus = [t for t in tiers if t.startswith("cuda") and budgets[t] > 0]
    compute = gpus[0] if gpus else "cpu"
    if compute not in budgets:
        raise PlacementError(
            f"max memory gives {compute}, where the model computes, no budget; add {compute}=SIZE "
            "(e.g. cpu=300MB) to it"
        )
    no_split = check_no_split(getattr(model, "no_split_modules", ()) if no_split is None else no_split)
    units = collect_units(model, no_split, dtype)
    groups = tie_groups(units)
    caps = dict(budgets)
    if len(gpus) > 1 and strategy in ("auto", "balanced"):
        share = sum(u.nbytes for u in units) / len(gpus) + max(u.nbytes for u in units)
        caps.update({g: min(caps[g], share) for g in gpus})

    def streamed(tier: str) -> bool:
        return tier == "disk" or (tier == "cpu" and compute != "cpu")

    reserve = 0
    while True:
        assigned = _fill(units, groups, tiers, {**caps, compute: caps.get(compute, 0) - reserve})
        sizes = [u.nbytes for u, t in zip(units, assigned, strict=True) if streamed(t)]
        need = max(sizes, default=0) * stream_buffer_count(prefetch, len(sizes))
        if need <= reserve:
            break
        reserve = need
    _check_compute_room(units, assigned, compute, budgets, reserve, streamed, prefetch)
    placements = [
        Placement(u.prefix, t, u.nbytes, type(u.module).__name__, u.whole)
        for u, t in zip(units, assigned, strict=True)
    ]
    shown = {t: (int(b) if b != math.inf else math.inf) for t, b in budgets.items()}
    return Plan(placements, compute, shown, reserved=reserve, prefetch=prefetch)  # type: ignore[arg-type]


def _fill(
    units: list[Unit], groups: list[list[int]], tiers: list[str], caps: Mapping[str, float]
) -> list[str]:
    """Tier per unit: each tie group goes on the first tier (from the current one) it fits."""
    assigned = [""] * len(units)
    used = dict.fromkeys(tiers, 0)
    current = 0
    for group in groups:
        size = sum(units[i].nbytes for i in group)
        while current < len(tiers) and used[tiers[current]] + size > caps[tiers[current]]:
            current += 1
        if current == len(tiers):
            total = sum(u.nbytes for u in units)
            room = ", ".join(f"{t} {format_size(int(caps[t]))}" for t in tiers)
            raise PlacementError(
                f"the model needs {format_size(total)} but the tiers hold only {room} "
                f"(stuck at {units[group[0]].prefix or 'the root module'}, {format_size(size)}); "
                "raise --max-memory or free disk space"
            )
        used[tiers[current]] += size
        for i in group:
            assigned[i] = tiers[current]
    return assigned


def _check_compute_room(
    units: list[Unit],
    assigned: list[str],
    compute: str,
    budgets: Mapping[str, float],
    reserve: int,
    streamed: Callable[[str], bool],
    prefetch: int,
) -> None:
    """An unsplittable streamed unit must fit, with its prefetch buffers, on the compute device."""
    if not reserve:
        return
    biggest = max((u for u, t in zip(units, assigned, strict=True) if streamed(t)), key=lambda u: u.nbytes)
    if reserve > budgets[compute] and biggest.nbytes <= budgets[compute]:  # the read-ahead is too deep
        fits = int(budgets[compute]) // biggest.nbytes - 1
        raise PlacementError(
            f"prefetch {prefetch} keeps {reserve // biggest.nbytes} stream buffers of the largest streamed "
            f"block ({biggest.prefix or 'the root module'}, {format_size(biggest.nbytes)}) on {compute}: {format_size(reserve)}, "
            f"more than its budget of {format_size(int(budgets[compute]))}; lower prefetch to at most {fits} "
            f"or raise the {compute} budget to at least {format_size(reserve)}"
        )
    if reserve > budgets[compute]:
        raise PlacementError(
            f"block {biggest.prefix} ({type(biggest.module).__name__}, {format_size(biggest.nbytes)}) "
            f"cannot be split, and streaming it needs {format_size(reserve)} on {compute}, whose budget "
            f"is {format_size(int(budgets[compute]))}; raise the {compute} budget to at least {format_size(reserve)}"
        )
