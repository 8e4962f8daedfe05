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

from lamina.errors import InvalidArgumentError

#: `torch.nn.init` functions modules call from `reset_parameters`; on meta tensors they compute
#: nothing, yet the first one pulls in torch._dynamo and sympy (~70 MB, ~1 s) through torch._refs.
INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextmanager
def skip_init() -> Iterator[None]:
    """`torch.nn.init`'s initializers return their tensor untouched inside this block (as
    transformers' `no_init_weights` does): for skeletons whose values are loaded afterwards."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


@contextmanager
def init_empty(include_buffers: bool = True) -> Iterator[None]:
    """Create modules inside this block on the meta device, their initializers skipped (`skip_init`).

    With `include_buffers=True` every tensor created inside lands on meta (zero memory). Buffers a
    model computes in `__init__` and never saves (rotary tables, masks) are then lost; pass
    `include_buffers=False` to keep buffers real and put only parameters on meta.
    """
    if not isinstance(include_buffers, bool):
        raise InvalidArgumentError(f"include_buffers must be True or False, got {include_buffers!r}")
    if include_buffers:
        with torch.device("meta"), skip_init():
            yield
        return

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        with skip_init():
            yield
    finally:
        handle.remove()
