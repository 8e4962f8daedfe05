"""`load_and_dispatch`: fill a meta-device model from a checkpoint, each tensor straight to its tier.

Tensors are read shard by shard and go directly where the plan puts them: resident ones into owned
memory on their device, cpu-tier ones (when computing on a GPU) into pinned RAM, disk-tier ones
either used in place from the checkpoint's safetensors (when the stored dtype is the run dtype) or
written once to the offload folder. No full state dict is ever built. Each tensor's shape is checked
against the model's (meta) parameter as it arrives, whatever its tier, so a checkpoint that does not
fit the model fails while loading, naming the tensor, not at the first forward pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.heap import release_free_heap
from lamina.loading.weight_files import open_weights_file, read_tensor
from lamina.placement.dispatch import dispatch, tensor_slots
from lamina.placement.offload_store import OffloadFolder, prepare_dir
from lamina.placement.plan import Placement, Plan, check_model, plan, to_dtype
from lamina.placement.source import TensorReader, WeightFiles

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

__all__ = ["load_and_dispatch", "to_dtype"]


def load_and_dispatch(
    model: nn.Module,
    checkpoint: str | Path | TensorReader,
    device_map: str | Plan = "auto",
    max_memory: str | Mapping[str, str | int | float] | None = None,
    no_split: Collection[str | type] | None = None,
    offload_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    strategy: str = "auto",
    prefetch: int = 1,
) -> nn.Module:
    """Load `checkpoint` into `model` (built under `init_empty()`) placed by `device_map`, ready to run.

    `checkpoint` is a .safetensors / .bin file, a directory, a `*.index.json`, or an opened Lamina
    checkpoint. `device_map="auto"` plans with `max_memory`, `no_split`, `strategy` and `prefetch`;
    a `Plan` is used as given. Layers placed on disk that cannot be read in place need `offload_dir`.
    `dtype` (`"float32"`, `"bfloat16"`, `"float16"` or the torch dtype) casts floating tensors; None
    keeps each tensor's stored dtype. A tensor whose shape differs from the model's is refused.
    """
    check_model(model, "load_and_dispatch")
    run_dtype = to_dtype(dtype)
    reader = _reader(checkpoint)
    if offload_dir is not None and not isinstance(offload_dir, str | os.PathLike):
        raise InvalidArgumentError(f"offload_dir must be a folder path, got {type(offload_dir).__name__}")
    if isinstance(device_map, Plan):
        the_plan = device_map
    elif isinstance(device_map, str) and device_map == "auto":
        the_plan = plan(model, max_memory, no_split, strategy, run_dtype, prefetch)
    else:
        raise InvalidArgumentError(f"device_map must be 'auto' or a Plan, got {device_map!r}")
    loader = _Loader(model, the_plan, reader, run_dtype)
    loader.run(offload_dir)
    return dispatch(model, the_plan, loader.streamed)


def _reader(checkpoint: Any) -> TensorReader:
    """The tensors of `checkpoint`: a path, an opened Lamina checkpoint, or any `TensorReader`."""
    if isinstance(checkpoint, str | os.PathLike):
        return WeightFiles(checkpoint)
    if isinstance(getattr(checkpoint, "file_of", None), dict):  # an HF directory: read its shards ourselves
        return WeightFiles(checkpoint.path, checkpoint.file_of)
    if callable(getattr(checkpoint, "tensor_names", None)) and callable(getattr(checkpoint, "read", None)):
        return checkpoint
    raise InvalidArgumentError(
        "checkpoint must be the path of a .safetensors or .bin file, a directory or a *.index.json, or an "
        f"opened Lamina checkpoint; got {type(checkpoint).__name__}"
    )


class _Loader:
    """One load: routes each checkpoint tensor to its tier and assigns it into the model."""

    def __init__(self, model: nn.Module, plan: Plan, reader: TensorReader, dtype: torch.dtype | None) -> None:
        self.model, self.plan, self.reader, self.dtype = model, plan, reader, dtype
        self.placement_of: dict[str, Placement] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # any alias -> the shape the model expects
        self.owners: dict[str, list[tuple[nn.Module, str, bool]]] = {}  # canonical name -> aliases
        canonical: dict[int, str] = {}
        self.canonical: dict[str, str] = {}  # any alias -> canonical name
        self.aliases: dict[str, list[str]] = {}  # canonical name -> every alias
        for placement in plan.placements:
            module = _submodule(model, placement.prefix)
            for name, owner, attr, is_param in tensor_slots(module, placement.prefix, placement.whole):
                tensor = (owner._parameters if is_param else owner._buffers)[attr]
                if tensor is None:
                    continue
                first = canonical.setdefault(id(tensor), name)
                self.canonical[name] = first
                self.aliases.setdefault(first, []).append(name)
                self.placement_of.setdefault(name, placement)
                self.shapes[name] = tuple(tensor.shape)
                self.owners.setdefault(first, []).append((owner, attr, is_param))
        self.streamed: dict[str, torch.Tensor] = {}
        self.filled: set[str] = set()

    def run(self, offload_dir: str | Path | None) -> None:
        ignored = [re.compile(p) for p in getattr(self.model, "ignored_checkpoint_keys", ())]
        names = [n for n in self.reader.tensor_names() if not any(p.search(n) for p in ignored)]
        unknown = [n for n in names if n not in self.canonical]
        if unknown:
            raise CheckpointError(
                f"checkpoint tensor {unknown[0]!r} (and {len(unknown) - 1} more) has no place in the model; "
                "is it the checkpoint of another model?"
            )
        wanted = set(names)
        stored = {n: header for n, header in self._headers().items() if n in wanted}
        for name, (_, shape) in stored.items():  # from the headers: before anything is read or written
            self._check_shape(name, shape, self._file_of(name))
        folder = self._offload_folder(names, {n: dtype for n, (dtype, _) in stored.items()}, offload_dir)
        # The lock makes a second process sharing the folder wait until this one has written it and
        # opened its files (the mappings stay valid after that), so neither reads the other's half.
        with folder.locked() if folder is not None else nullcontext():
            reuse = folder is not None and folder.is_complete()
            if folder is not None and not reuse:
                folder.begin()  # writable? the old index goes before any of its files is replaced
            skip = {n for unit in folder.units.values() for n in unit} if reuse else set()
            try:
                for name, tensor in self._tensors(names, wanted - skip):
                    self._check_shape(name, tuple(tensor.shape), self._file_of(name))
                    self._route(name, tensor, folder)
                if folder is not None and not skip:
                    folder.finish()
            except BaseException:
                if folder is not None and not skip:
                    folder.abort()
                raise
            if folder is not None:
                for name, (file, tensor) in folder.open().items():
                    self._check_shape(name, tuple(tensor.shape), file)
                    self._host(name, tensor)
        self._check_complete()
        release_free_heap()

    def _file_of(self, name: str) -> object:
        """Where checkpoint tensor `name` is stored, for messages."""
        if isinstance(self.reader, WeightFiles):
            return self.reader.file_of[name]
        return getattr(self.reader, "path", "the checkpoint")

    def _check_shape(self, name: str, shape: tuple[int, ...], where: object) -> None:
        expected = self.shapes[name]
        if shape != expected:
            raise CheckpointError(
                f"tensor {name} has shape {shape} in {where} but the model config implies {expected}; "
                "the config and the weights disagree"
            )

    def _tensors(self, names: list[str], wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors in `wanted` (ignored and reused ones left out), one at a time."""
        if isinstance(self.reader, WeightFiles):
            for file, in_file in self.reader.shards():
                chosen = [n for n in in_file if n in wanted]
                if not chosen:
                    continue
                handle = open_weights_file(file)
                for name in chosen:
                    yield name, read_tensor(handle, file, name)
                del handle  # unmaps the shard once its tensors are placed
        else:
            for name in names:
                if name in wanted:
                    yield name, self.reader.read(name)

    def _headers(self) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
        """Stored dtype (None: not a float dtype streamed in place) and shape of each tensor in a
        safetensors file, from the headers only."""
        out: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
        if isinstance(self.reader, WeightFiles):
            for file, names in self.reader.shards():
                if file.suffix == ".safetensors":
                    with safe_open(str(file), framework="pt") as handle:
                        for n in names:
                            info = handle.get_slice(n)
                            out[n] = (_SAFETENSORS_DTYPES.get(info.get_dtype()), tuple(info.get_shape()))
        return out

    def _offload_folder(
        self, names: list[str], stored: dict[str, torch.dtype | None], offload_dir: str | Path | None
    ) -> OffloadFolder | None:
        """The folder for disk-tier tensors that cannot be streamed in place from the checkpoint."""
        units: dict[str, list[str]] = {}
        for name in names:
            placement = self.placement_of[name]
            in_place = name in stored and (self.dtype is None or stored[name] == self.dtype)
            if placement.tier == "disk" and not in_place:
                units.setdefault(placement.prefix, []).append(name)
        if not units:
            return None
        if isinstance(self.reader, WeightFiles):
            source = self.reader.fingerprint()
        else:
            path = Path(getattr(self.reader, "path", ""))
            stat = path.stat() if path.is_file() else None
            source = [str(path.resolve()), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0]
        key = {"source": source, "dtype": str(self.dtype)}
        return OffloadFolder(prepare_dir(offload_dir, probe=False), key, units)

    def _run_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._run_dtype(tensor))

    def _route(self, name: str, tensor: torch.Tensor, folder: OffloadFolder | None) -> None:
        placement = self.placement_of[name]
        tier = placement.tier
        if not self.plan.is_streamed(tier):
            device = torch.device(self.plan.execution_device(tier))
            placed = tensor.to(device=device, dtype=self._run_dtype(tensor))
            if placed.data_ptr() == tensor.data_ptr() and isinstance(self.reader, WeightFiles):
                placed = placed.clone()  # own the memory instead of keeping the checkpoint's file pages
            self._assign(name, placed)
        elif tier == "cpu":
            pinned = torch.empty(tensor.shape, dtype=self._run_dtype(tensor), pin_memory=True)
            self._host(name, pinned.copy_(tensor))
        elif (
            folder is not None and placement.prefix in folder.units and name in folder.units[placement.prefix]
        ):
            folder.add(placement.prefix, name, self._cast(tensor))
        else:
            self._host(name, tensor)  # memory-mapped from the checkpoint, used in place

    def _assign(self, name: str, tensor: torch.Tensor) -> None:
        first = self.canonical[name]
        param = nn.Parameter(tensor, requires_grad=False)
        for owner, attr, is_param in self.owners[first]:
            if is_param:
                owner._parameters[attr] = param
            else:
                owner._buffers[attr] = tensor
        self.filled.add(first)

    def _host(self, name: str, tensor: torch.Tensor) -> None:
        first = self.canonical[name]
        for alias in self.aliases[first]:
            self.streamed[alias] = tensor
        self.filled.add(first)

    def _check_complete(self) -> None:
        for first, owners in self.owners.items():
            owner, attr, is_param = owners[0]
            tensor = (owner._parameters if is_param else owner._buffers)[attr]
            if first in self.filled:
                continue
            if tensor.device.type == "meta":
                raise CheckpointError(
                    f"the checkpoint has no tensor {first!r}; it is incomplete or for another model "
                    "(a buffer computed in __init__ needs init_empty(include_buffers=False))"
                )
            device = torch.device(self.plan.execution_device(self.placement_of[first].tier))
            if tensor.device != device:
                self._assign(first, tensor.to(device))


def _submodule(model: nn.Module, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix)
    except AttributeError:
        raise InvalidArgumentError(
            f"the plan names module {prefix!r}, which this model does not have"
        ) from None
