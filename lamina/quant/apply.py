"""Replace a model's `nn.Linear` modules with quantized ones: `quantize_model(model, method, ...)`.

Which layers stay float: embeddings (they are lookups, not matmuls) and the output head (`lm_head`,
or whatever `model.output_embeddings()` returns; often tied to the embedding, and the layer most
sensitive to quantization). Norms and biases are
untouched. Everything else that is an `nn.Linear` (attention and MLP projections) is quantized.

`quantize_linear` is the per-layer entry point the loader uses to quantize while loading, one layer
as soon as its weight is filled, so peak memory stays near the quantized size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lamina.errors import InvalidArgumentError
from lamina.quant.base import QuantizedLinear
from lamina.quant.blockq import BlockQuantLinear
from lamina.quant.fp8 import Fp8Linear
from lamina.quant.gptq import collect_hessians, gptq_linear
from lamina.quant.half import HalfLinear
from lamina.quant.int4 import GROUP_SIZES, Int4Linear
from lamina.quant.int8 import Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import NF4Linear

#: `--quantize` value -> (layer class, options). gptq needs calibration data and is handled apart.
_SCHEMES: dict[str, tuple[type[QuantizedLinear], dict[str, Any]]] = {
    "int8": (Int8Linear, {}),
    "int4": (Int4Linear, {"params": "hqq"}),
    "int4-minmax": (Int4Linear, {"params": "minmax"}),
    "nf4": (NF4Linear, {"quant_type": "nf4", "double_quant": False}),
    "nf4-dq": (NF4Linear, {"quant_type": "nf4", "double_quant": True}),
    "fp4": (NF4Linear, {"quant_type": "fp4", "double_quant": False}),
    "fp4-dq": (NF4Linear, {"quant_type": "fp4", "double_quant": True}),
    "llm.int8": (LLMInt8Linear, {}),
    "fp8": (Fp8Linear, {}),
    "bf16": (HalfLinear, {"method": "bf16"}),
    "fp16": (HalfLinear, {"method": "fp16"}),
}
METHODS = (*_SCHEMES, "gptq")
#: Methods whose layout has a group size (`--group-size` applies).
GROUPED_METHODS = ("int4", "int4-minmax", "gptq")
DEFAULT_GROUP_SIZE = 128
#: Module names (last dotted component) left float by default.
DEFAULT_SKIP = ("lm_head",)

#: Layer classes by the `method` recorded for a layer, for loading saved checkpoints (GGUF blocks kept
#: as stored come from a GGUF, never from `--quantize`, but a model holding them saves and loads).
LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {
    **{m: cls for m, (cls, _) in _SCHEMES.items()},
    BlockQuantLinear.method: BlockQuantLinear,
}


def validate_method(method: str, group_size: int | None = None) -> None:
    """Raise `InvalidArgumentError` for an unknown method or group size, listing the valid ones."""
    if method not in METHODS:
        raise InvalidArgumentError(
            f"unknown quantization method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise InvalidArgumentError(f"group size must be an integer, got {group_size!r}")
    if group_size is not None and method in GROUPED_METHODS and group_size not in GROUP_SIZES:
        raise InvalidArgumentError(
            f"group size {group_size} is not supported for {method}; use one of {list(GROUP_SIZES)}"
        )


def quantize_linear(
    linear: nn.Linear, method: str, name: str = "?", group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedLinear:
    """Quantize one float linear with a calibration-free method (everything but gptq)."""
    validate_method(method, group_size)
    if method == "gptq":
        raise InvalidArgumentError("gptq needs calibration data; use quantize_model(..., calibration=...)")
    cls, opts = _SCHEMES[method]
    return cls.from_float(linear, name=name, group_size=group_size, **opts)


def float_linear_names(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> set[str]:
    """Qualified names of linears that stay float: the model's output head (whatever its family calls
    it, via `output_embeddings()`) and any module whose last name component is in `skip`."""
    head = model.output_embeddings() if hasattr(model, "output_embeddings") else None
    skipped = set(skip)
    return {name for name, mod in model.named_modules() if mod is head or name.rsplit(".", 1)[-1] in skipped}


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """The float `nn.Linear` modules `quantize_model` replaces, by qualified name."""
    keep = float_linear_names(model, skip)
    return {
        name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name not in keep
    }


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    calibration: list[torch.Tensor] | None = None,
    act_order: bool = False,
    skip: Iterable[str] = DEFAULT_SKIP,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Replace the model's linears in place (see module docstring for what stays float).

    `calibration`: token-id batches [B, T] for gptq (ignored by the other methods).
    `progress(name)` is called after each layer is quantized.
    """
    validate_method(method, group_size)
    linears = quantizable_linears(model, skip)
    hessians: dict[str, torch.Tensor] = {}
    if method == "gptq":
        if not calibration:
            raise InvalidArgumentError(
                "gptq needs calibration text; pass --calibration FILE with some text in it"
            )
        hessians = collect_hessians(model, linears, calibration)
    for name, linear in linears.items():
        if method == "gptq":
            new = gptq_linear(linear, hessians.pop(name), group_size, act_order, name=name)
        else:
            new = quantize_linear(linear, method, name, group_size)
        set_submodule(model, name, new)
        if progress is not None:
            progress(name)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized linear in the model, by qualified name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (e.g. a linear by its quantized version)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
