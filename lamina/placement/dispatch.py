"""Dispatch: wire a loaded model to its plan — input moves between devices, streamed layers.

Resident layers already hold their weights on their device. Streamed layers (disk tier; cpu tier
when computing on a GPU) get a streamer that hands their weights to the compute device just in
time, prefetching the next layers. Hooks are the standard `nn.Module` forward hooks; nothing in
torch is patched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lamina.placement.page_streamer import PageStreamer
from lamina.placement.plan import Plan
from lamina.placement.streaming import DeviceStreamer, Slot
from lamina.placement.units import join


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`; other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple | list):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def tensor_slots(module: nn.Module, prefix: str, whole: bool) -> list[tuple[str, nn.Module, str, bool]]:
    """(full name, owning module, attribute, is parameter) for each tensor of a placement unit."""
    out = []
    owners = module.named_modules(remove_duplicate=False) if whole else [("", module)]
    for sub_name, sub in owners:
        for attr in sub._parameters:
            out.append((join(join(prefix, sub_name), attr), sub, attr, True))
        for attr in sub._buffers:
            out.append((join(join(prefix, sub_name), attr), sub, attr, False))
    return out


def dispatch(model: nn.Module, plan: Plan, streamed: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach device-moving hooks and the streamer; `streamed` holds host tensors of streamed layers."""
    _close_previous(model)
    layers = []
    on_gpu = not plan.on_cpu or any(p.tier.startswith("cuda") for p in plan.placements)
    for placement in plan.placements:
        module = model.get_submodule(placement.prefix)
        device = torch.device(plan.execution_device(placement.tier))
        module.compute_device = device  # where its activations (and KV cache) live
        if on_gpu:
            module.register_forward_pre_hook(
                lambda m, a, k, d=device: (move(a, d), move(k, d)), with_kwargs=True
            )
        if plan.is_streamed(placement.tier):
            slots = [
                Slot(owner, attr, is_param, streamed[name])
                for name, owner, attr, is_param in tensor_slots(module, placement.prefix, placement.whole)
                if name in streamed
            ]
            layers.append((module, slots))
    if on_gpu:
        model.register_forward_pre_hook(_remember_input_device, with_kwargs=True, prepend=True)
        model.register_forward_hook(_return_to_input_device)
    streamer = None
    if layers:
        compute = torch.device(plan.compute_device)
        if compute.type == "cpu":
            streamer = PageStreamer(layers, plan.prefetch)
        else:
            streamer = DeviceStreamer(layers, plan.prefetch, compute)
    model.lamina_plan = plan
    model.lamina_streamer = streamer
    return model


def _close_previous(model: nn.Module) -> None:
    streamer = getattr(model, "lamina_streamer", None)
    if streamer is not None:
        streamer.close()


def _first_tensor(args: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value
    return None


def _remember_input_device(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    first = _first_tensor(args, kwargs)
    module.lamina_input_device = first.device if first is not None else None


def _return_to_input_device(module: nn.Module, args: Any, output: Any) -> Any:
    device = getattr(module, "lamina_input_device", None)
    return move(output, device) if device is not None else output
