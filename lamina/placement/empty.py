"""`init_empty()`: build any nn.Module as a skeleton on the meta device, using no memory.

The skeleton has every parameter's name, shape and dtype, which is all the planner needs; the
weights arrive later, straight to their tier, from `load_and_dispatch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook


@contextmanager
def init_empty(include_buffers: bool = True) -> Iterator[None]:
    """Create modules inside this block on the meta device.

    With `include_buffers=True` every tensor created inside lands on meta (zero memory). Buffers a
    model computes in `__init__` and never saves (rotary tables, masks) are then lost; pass
    `include_buffers=False` to keep buffers real and put only parameters on meta.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()
