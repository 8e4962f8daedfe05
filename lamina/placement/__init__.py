"""Placement: plan which layer lives on which tier, load straight to it, stream the rest."""

from lamina.placement.empty import init_empty
from lamina.placement.load import load_and_dispatch
from lamina.placement.memory import parse_max_memory, parse_size
from lamina.placement.plan import Placement, PlacementError, Plan, plan

__all__ = [
    "Placement",
    "PlacementError",
    "Plan",
    "init_empty",
    "load_and_dispatch",
    "parse_max_memory",
    "parse_size",
    "plan",
]
