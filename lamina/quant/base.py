"""The one interface every quantization scheme implements.

A `QuantizedLinear` replaces an `nn.Linear` (same `in_features` / `out_features` / optional bias,
same `forward(x) -> y`). Each scheme holds its weights in its own runtime layout and knows how to:

- build itself from a float linear (`from_float`),
- export its tensors in a portable, device-independent form (`export_tensors`) and rebuild itself
  from them plus a JSON-able scheme description (`from_tensors`, `scheme_config`),
- give back a float weight (`dequantize`) for tests, GPTQ, and slow fallbacks,
- report its resident weight bytes (`weight_bytes`).

Saving goes through `export_tensors` rather than `state_dict` because some runtime layouts are
kernel- and device-specific (the CPU int4 kernel packs nibbles in an ISA-dependent order); the
exported form is the same on every machine.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from lamina.errors import CheckpointError, InvalidArgumentError


class QuantizedLinear(nn.Module, ABC):
    """Base class: a linear layer whose weight is stored quantized."""

    #: Scheme name as written in the scheme file and accepted by `--quantize`.
    method: ClassVar[str]
    #: Whether `torch.compile` can trace `forward` without a graph break (a compiled decode step
    #: skips compiling models with layers that cannot, rather than trying for a minute and failing).
    compiles: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @abstractmethod
    def from_float(cls, linear: nn.Linear, **opts: Any) -> QuantizedLinear:
        """Quantize a float `nn.Linear` into this scheme."""

    @classmethod
    @abstractmethod
    def from_tensors(
        cls, in_features: int, out_features: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> QuantizedLinear:
        """Rebuild a layer from `export_tensors()` output and its `scheme_config()`."""

    @classmethod
    def config_problem(cls, config: dict[str, Any]) -> str | None:
        """What is wrong with a layer's scheme-file entry (its `method`, `in_features`,
        `out_features` and options) for `from_tensors`, worded to follow "layer NAME", e.g.
        "has group_size 0, not one of [32, 64, 128, 256]"; None when it is usable. Subclasses add
        their options' checks to these."""
        for key in ("in_features", "out_features"):
            problem = field_problem(config, key, is_positive_int, "not a positive integer")
            if problem:
                return problem
        return None

    @abstractmethod
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Portable tensors (CPU, device-independent layout) that `from_tensors` accepts."""

    def scheme_config(self) -> dict[str, Any]:
        """JSON-able description of the scheme and its options, e.g. {"method": "int4", "group_size": 128}."""
        return {"method": self.method}

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] this layer represents."""

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> QuantizedLinear | None:
        """One layer computing all `layers` (same scheme, same input), outputs concatenated in order;
        None where the scheme cannot merge them (the default). Used to fuse q/k/v and gate/up."""
        return None

    def weight_bytes(self) -> int:
        """Bytes of every tensor this layer keeps resident (quantized weight, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in self._resident_tensors())

    def _resident_tensors(self) -> list[torch.Tensor]:
        return [*self.buffers(), *self.parameters()]

    @classmethod
    def alike(cls, layers: list[QuantizedLinear], key: Callable[[Any], object]) -> bool:
        """Whether every layer is a `cls` with the same `key(layer)`: what `concatenate` needs them to
        share (input width, options, device)."""
        return all(type(layer) is cls for layer in layers) and len({key(layer) for layer in layers}) == 1

    @staticmethod
    def concatenated_bias(layers: list[QuantizedLinear]) -> torch.Tensor | None:
        """The biases of `layers` end to end (zeros where one has none), or None when none has one."""
        present = [layer.bias for layer in layers if layer.bias is not None]
        if not present:
            return None
        like = present[0].detach()
        return torch.cat(
            [
                layer.bias.detach() if layer.bias is not None else like.new_zeros(layer.out_features)
                for layer in layers
            ]
        )

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.scheme_config().items() if k != "method")
        return f"in_features={self.in_features}, out_features={self.out_features}, {opts}".rstrip(", ")


def is_positive_int(value: Any) -> bool:
    """An int above 0 (JSON's true/false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def field_problem(
    config: dict[str, Any], key: str, valid: Callable[[Any], bool], expected: str, required: bool = True
) -> str | None:
    """A scheme-file field's problem, worded to follow "layer NAME": "lacks field KEY" (when
    `required`), or "has KEY VALUE, EXPECTED" when `valid(value)` is false; None when the field is
    fine (or absent and optional)."""
    if key not in config:
        return f"lacks field {key!r}" if required else None
    value = config[key]
    return None if valid(value) else f"has {key} {value!r}, {expected}"


def require_tensors(
    tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str
) -> list[torch.Tensor]:
    """Fetch the named tensors or raise a `CheckpointError` naming what is missing."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(
            f"quantized layer {where} lacks tensors {missing}; the checkpoint is incomplete, re-run `lamina quantize`"
        )
    return [tensors[n] for n in names]


def check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, where: str) -> None:
    """Raise a `CheckpointError` when a stored tensor's shape disagrees with the scheme file."""
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"quantized layer {where}: tensor {name} has shape {tuple(t.shape)}, the scheme file implies {shape}; "
            "the checkpoint and its quant_config.json do not match, re-run `lamina quantize`"
        )


def layer_group_size(in_features: int, group_size: int, allowed: tuple[int, ...], where: str) -> int:
    """The group size a layer gets: `group_size` when it divides in_features, else the largest smaller
    allowed size that does (with a warning, e.g. 576-wide SmolLM2 layers at 128 -> 64); an error naming
    the layer when none does."""
    if group_size not in allowed:
        raise InvalidArgumentError(f"group size {group_size} is not supported; use one of {list(allowed)}")
    if in_features % group_size == 0:
        return group_size
    fits = [g for g in allowed if g < group_size and in_features % g == 0]
    if not fits:
        raise InvalidArgumentError(
            f"group size {group_size} does not divide in_features={in_features} of layer {where}, and no smaller "
            f"supported group size {list(allowed)} does; leave that layer float"
        )
    warnings.warn(
        f"group size {group_size} does not divide in_features={in_features}; layers that wide use group size "
        f"{max(fits)}",
        stacklevel=3,
    )
    return max(fits)
