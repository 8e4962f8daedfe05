"""Memory sizes, `--max-memory` budgets, device checks and this machine's bandwidths.

Sizes accept decimal (`MB` = 10^6) and binary (`MiB` = 2^20) units, like the tools users know. A
budget maps a tier (`cuda:N`, `cpu`, `disk`) to bytes; devices are checked against this machine so a
typo such as `cuda:3` on a one-GPU box fails at once with a one-line error, not mid-load.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lamina.errors import InvalidArgumentError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes from `300MB`, `2GiB`, `1.5GB`, `1024` or an int; MB = 10^6 and MiB = 2^20."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"memory size {value!r} is not a size; write e.g. 300MB or 2GiB")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidArgumentError(
                f"memory size {value} is not a finite number; give a number of bytes or a size such as 300MB"
            )
        if value < 0:
            raise InvalidArgumentError(f"memory size {value} is negative; give a size such as 300MB")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise InvalidArgumentError(
            f"cannot read memory size {value!r}; write a number with a unit such as 300MB, 1.5GB or 2GiB"
        )
    size = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(size):
        raise InvalidArgumentError(f"memory size {value!r} is too large; give a size such as 300MB or 2GiB")
    return int(size)


def normalize_device(name: str) -> str:
    """`cuda` -> `cuda:0`, `CPU` -> `cpu`; checks that the device exists on this machine."""
    text = str(name).strip().lower()
    if text in ("cpu", "disk"):
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text) or re.fullmatch(r"(\d+)", text)
    if not match:
        raise InvalidArgumentError(f"unknown device {name!r}; use cpu, disk, cuda or cuda:N")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InvalidArgumentError(f"device {name!r} asked for, but this machine has no CUDA GPU; use cpu")
    if index >= count:
        raise InvalidArgumentError(
            f"device {name!r} does not exist: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}"
        )
    return f"cuda:{index}"


def parse_max_memory(spec: str | Mapping[str, str | int | float] | None) -> dict[str, int] | None:
    """`"cpu=300MB,cuda:0=4GB"` or `{"cpu": "300MB"}` -> `{"cpu": 300_000_000}` (None stays None)."""
    if spec is None:
        return None
    if not isinstance(spec, str | Mapping):
        raise InvalidArgumentError(
            f"max_memory must be a string like 'cpu=300MB,cuda:0=4GB' or a dict like "
            f"{{'cpu': '300MB', 'cuda:0': '4GB'}}, got {type(spec).__name__} {spec!r}"
        )
    if isinstance(spec, str):
        items: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            device, sep, size = part.partition("=")
            if not sep or not device.strip() or not size.strip():
                raise InvalidArgumentError(
                    f"cannot read --max-memory entry {part!r}; write DEVICE=SIZE pairs, e.g. cpu=300MB,cuda:0=4GB"
                )
            items.append((device, size))
        if not items:
            raise InvalidArgumentError("--max-memory is empty; write DEVICE=SIZE pairs, e.g. cpu=300MB")
    else:
        items = list(spec.items())
    budget: dict[str, int] = {}
    for device, size in items:
        name = normalize_device(device)
        if name in budget:
            raise InvalidArgumentError(f"--max-memory names {name} twice; give each device once")
        budget[name] = parse_size(size)
    return budget


def default_max_memory() -> dict[str, int]:
    """90% of free memory on each GPU and of available RAM: what `max_memory=None` means."""
    import psutil

    budget = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            budget[f"cuda:{index}"] = int(free * 0.9)
    budget["cpu"] = int(psutil.virtual_memory().available * 0.9)
    return budget


def format_size(nbytes: int) -> str:
    """Short decimal size for tables: `113.2 MB`."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def tensor_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes `tensor` takes in `dtype` (floating tensors only are cast; meta tensors work)."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.numel() * dtype.itemsize
    return tensor.numel() * tensor.element_size()


def named_tensors(module: nn.Module, recurse: bool = True) -> Iterable[tuple[str, torch.Tensor]]:
    """Parameters and buffers by name, each shared tensor once."""
    yield from module.named_parameters(recurse=recurse)
    yield from module.named_buffers(recurse=recurse)


def module_nbytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's parameters and buffers, counting a tied tensor once."""
    return sum(tensor_nbytes(t, dtype) for _, t in named_tensors(module))


@dataclass(frozen=True)
class Bandwidths:
    """Measured bytes/second of this machine: RAM copy, disk sequential read, host-to-device copy."""

    ram: float
    disk: float
    host_to_device: float | None
    gpu: float | None  # device memory read bandwidth of cuda:0


def measure_bandwidths(scratch_dir: str | Path | None = None, nbytes: int = 64 * 2**20) -> Bandwidths:
    """Time a RAM copy, a cold sequential file read and (with a GPU) a pinned host-to-device copy."""
    return Bandwidths(
        ram=_ram_bandwidth(nbytes),
        disk=disk_read_bandwidth(scratch_dir, nbytes),
        host_to_device=_h2d(nbytes),
        gpu=_gpu_bandwidth(nbytes),
    )


def _copy_bandwidth(device: str, nbytes: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    if device != "cpu":
        torch.cuda.synchronize()
    # A copy reads and writes each byte; decoding only reads weights, so count both directions.
    return 4 * nbytes * 2 / (time.perf_counter() - start)


def _ram_bandwidth(nbytes: int) -> float:
    return _copy_bandwidth("cpu", nbytes)


def _gpu_bandwidth(nbytes: int) -> float | None:
    return _copy_bandwidth("cuda:0", nbytes) if torch.cuda.is_available() else None


def disk_read_bandwidth(scratch_dir: str | Path | None = None, nbytes: int = 64 * 2**20) -> float:
    """Sequential read of a fresh file whose pages were dropped from the page cache (bytes/s)."""
    block = bytearray(4 * 2**20)
    with tempfile.NamedTemporaryFile(dir=scratch_dir, prefix=".lamina-bw-") as f:
        for _ in range(nbytes // len(block)):
            f.write(os.urandom(1024) * (len(block) // 1024))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        view = memoryview(block)
        start = time.perf_counter()
        offset = 0
        while (n := os.preadv(f.fileno(), [view], offset)) > 0:
            offset += n
        return offset / (time.perf_counter() - start)


def _h2d(nbytes: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * nbytes / (time.perf_counter() - start)
