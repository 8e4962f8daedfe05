"""Streaming offloaded layers to the compute device, the next ones read while this one computes.

Shared machinery (forward hooks on each streamed layer, which layers come next) and the GPU
streamer; the CPU one is in `page_streamer.py`.

`DeviceStreamer` (computing on a GPU): `prefetch + 1` device buffers, each the size of the largest
streamed layer, reused in turn. A reader thread copies layer i+1's host tensors (pinned RAM for the
cpu tier; mapped file pages into pinned staging buffers for the disk tier) and issues the
host-to-device copy on a separate CUDA stream, recording an event that the compute stream waits on
right before layer i+1 runs. A buffer is refilled only after the compute stream is done with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass
class Slot:
    """Where one tensor of a streamed layer lives: the owning module and attribute name."""

    module: nn.Module
    attr: str
    is_param: bool
    host: torch.Tensor  # CPU source: pinned RAM or memory-mapped file pages

    def bind(self, tensor: torch.Tensor) -> None:
        """Make the module use `tensor` for this attribute (tied modules share the Parameter)."""
        if self.is_param:
            param = self.module._parameters[self.attr]
            if param is not None and param.device == tensor.device and param.dtype == tensor.dtype:
                param.data = tensor
            else:
                self.module._parameters[self.attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            self.module._buffers[self.attr] = tensor


StreamedLayer = Sequence[Slot]


class _Streamer(ABC):
    """Shared bookkeeping: hooks on each layer, and which layers to prefetch next (cyclically)."""

    def __init__(self, layers: Sequence[tuple[nn.Module, StreamedLayer]], prefetch: int) -> None:
        self.layers = [slots for _, slots in layers]
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamina-stream")
        self.handles = []
        for index, (module, _) in enumerate(layers):
            self.handles.append(module.register_forward_pre_hook(lambda m, a, i=index: self.before(i)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, i=index: self.after(i)))

    def upcoming(self, index: int) -> list[int]:
        """The next `prefetch` layers after `index`, wrapping to the first for the next token."""
        n = len(self.layers)
        return [(index + k) % n for k in range(1, min(self.prefetch, n - 1) + 1)]

    @abstractmethod
    def before(self, index: int) -> None:
        """Called right before layer `index` runs: make its weights usable, prefetch the next."""

    @abstractmethod
    def after(self, index: int) -> None:
        """Called right after layer `index` ran: its weights may now be replaced."""

    def close(self) -> None:
        """Remove the hooks and stop the reader thread."""
        for handle in self.handles:
            handle.remove()
        self.pool.shutdown(wait=True)


class DeviceStreamer(_Streamer):
    """GPU compute: layers are copied into reused device buffers on a side stream, ahead of use."""

    def __init__(
        self, layers: Sequence[tuple[nn.Module, StreamedLayer]], prefetch: int, device: torch.device
    ) -> None:
        super().__init__(layers, prefetch)
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.offsets = [_layout(slots) for slots in self.layers]
        size = max(offsets[-1] for offsets in self.offsets)
        count = min(prefetch, len(self.layers) - 1) + 1
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
        staged = any(not slot.host.is_pinned() for slots in self.layers for slot in slots)
        self.staging = (
            [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(count)] if staged else []
        )
        self.freed: list[torch.cuda.Event | None] = [None] * count  # compute done with buffer
        self.copied: list[torch.cuda.Event | None] = [None] * count  # last copy out of staging done
        self.next_buffer = 0
        self.owner: list[int | None] = [None] * count  # layer whose weights a buffer holds or will
        self.loading: dict[int, tuple[int, Future[torch.cuda.Event]]] = {}
        self.in_use: dict[int, int] = {}  # layer -> buffer, while the layer computes

    def _views(self, base: torch.Tensor, index: int) -> list[torch.Tensor]:
        offsets = self.offsets[index]
        return [
            base[offsets[k] : offsets[k] + s.host.numel() * s.host.element_size()]
            .view(s.host.dtype)
            .view(s.host.shape)  # [bytes] -> host dtype -> host shape
            for k, s in enumerate(self.layers[index])
        ]

    def _free_buffer(self) -> int:
        """The next buffer in turn that no running layer uses (a new one if all are in use)."""
        busy = set(self.in_use.values())
        for step in range(len(self.buffers)):
            buffer = (self.next_buffer + step) % len(self.buffers)
            if buffer not in busy:
                self.next_buffer = (buffer + 1) % len(self.buffers)
                return buffer
        size = self.buffers[0].numel()
        self.buffers.append(torch.empty(size, dtype=torch.uint8, device=self.device))
        if self.staging:
            self.staging.append(torch.empty(size, dtype=torch.uint8, pin_memory=True))
        self.freed.append(None)
        self.copied.append(None)
        self.owner.append(None)
        return len(self.buffers) - 1

    def _schedule(self, index: int) -> None:
        buffer = self._free_buffer()
        previous = self.owner[buffer]
        if previous is not None and self.loading.get(previous, (None,))[0] == buffer:
            del self.loading[previous]  # prefetched but not run (out of order): reload it when it runs
        self.owner[buffer] = index
        freed = self.freed[buffer]
        self.loading[index] = (buffer, self.pool.submit(self._copy, index, buffer, freed))

    def _copy(self, index: int, buffer: int, freed: torch.cuda.Event | None) -> torch.cuda.Event:
        slots = self.layers[index]
        sources = [s.host for s in slots]
        if self.staging:
            if self.copied[buffer] is not None:
                self.copied[buffer].synchronize()  # the staging buffer's previous copy has left it
            staged = self._views(self.staging[buffer], index)
            for dst, slot in zip(staged, slots, strict=True):
                if not slot.host.is_pinned():
                    dst.copy_(slot.host)  # reads the mapped file pages (disk or page cache)
            sources = [s.host if s.host.is_pinned() else d for s, d in zip(slots, staged, strict=True)]
        with torch.cuda.stream(self.copy_stream):
            if freed is not None:
                self.copy_stream.wait_event(freed)
            for dst, src in zip(self._views(self.buffers[buffer], index), sources, strict=True):
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.copied[buffer] = done
        return done

    def before(self, index: int) -> None:
        if index not in self.loading:
            self._schedule(index)
        buffer, future = self.loading.pop(index)
        torch.cuda.current_stream(self.device).wait_event(future.result())
        for slot, view in zip(self.layers[index], self._views(self.buffers[buffer], index), strict=True):
            slot.bind(view)
        self.in_use[index] = buffer
        for nxt in self.upcoming(index):
            if nxt not in self.loading and nxt not in self.in_use:
                self._schedule(nxt)

    def after(self, index: int) -> None:
        buffer = self.in_use.pop(index)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.freed[buffer] = event


def _layout(slots: StreamedLayer) -> list[int]:
    """Byte offset of each tensor in a layer's buffer (256-byte aligned), then the total size."""
    offsets = [0]
    for slot in slots:
        size = slot.host.numel() * slot.host.element_size()
        offsets.append(offsets[-1] + (size + 255) // 256 * 256)
    return offsets
