"""Streaming disk-tier layers when computing on the CPU: page cache when it has them, disk when not.

A disk-tier layer's weights are memory-mapped safetensors. While layer i computes, a reader thread
looks at layers i+1..i+k:

- if a sample of their pages is in the page cache, the layer runs in place on the mapped file, with
  no copy at all (copying would double the memory traffic of a decoding step);
- otherwise the thread reads the layer's byte range from the file into one of `prefetch + 1` reused,
  page-aligned buffers (`os.preadv`), and the layer runs on views of it. The first such read goes
  through the page cache (so with RAM to spare the layer is cached from then on); a layer that
  misses again is read with `O_DIRECT`: under a tight memory limit (a cgroup), filling the cache
  would force the kernel to reclaim page by page, and reading through it would copy twice.
The buffers are the `reserved` bytes of the plan, allocated on the first read from disk; the mapped
pages are file pages, not the process's anonymous memory. Nothing is allocated per token.

Reads go by path, so each file is checked to be the very file mapped (its inode, from
`/proc/self/maps`): another process may have replaced it since (rewriting a shared offload folder
for another dtype or model). Such a layer is then copied from the mapping, which still holds the
original, never read from the new file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from lamina.placement.streaming import PAGE, StreamedLayer, _libc, _Streamer

MERGE_GAP = 2**20  # tensors of one file closer than this are read in one request


@dataclass(frozen=True)
class Run:
    """One aligned read: `length` bytes of `path` (inode `inode`) from `offset` into the layer
    buffer at `into`."""

    path: str
    offset: int
    length: int
    into: int
    inode: int = 0


FileMap = tuple[int, int, int, str, int]  # start, end, file offset, path, inode


def _mappings() -> list[FileMap]:
    """(start, end, file offset, path, inode) of this process's file mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, int(parts[2], 16), parts[5].rstrip("\n"), int(parts[4])))
    return out


def file_location(tensor: torch.Tensor, mappings: list[FileMap]) -> tuple[str, int, int] | None:
    """(path, byte offset, inode) of a memory-mapped tensor's data, or None if it is not file-backed."""
    ptr = tensor.data_ptr()
    for start, end, offset, path, inode in mappings:
        if start <= ptr < end:
            return path, ptr - start + offset, inode
    return None


def plan_reads(tensors: Sequence[torch.Tensor]) -> tuple[list[Run], list[int], int] | None:
    """The aligned reads that bring a layer into a buffer, each tensor's offset in it, the size.

    None when a tensor is not backed by a file (then the layer can only run in place).
    """
    mappings = _mappings()
    located = []
    for tensor in tensors:
        where = file_location(tensor, mappings)
        if where is None:
            return None
        located.append((where[0], where[1], tensor.numel() * tensor.element_size(), where[2]))
    order = sorted(range(len(located)), key=lambda k: located[k][:2])
    groups: list[list[int]] = []
    for k in order:
        path, offset, _, _ = located[k]
        last = located[groups[-1][-1]] if groups else None
        if last is not None and last[0] == path and offset <= last[1] + last[2] + MERGE_GAP:
            groups[-1].append(k)
        else:
            groups.append([k])
    runs, where_in_buffer, size = [], [0] * len(tensors), 0
    for group in groups:
        path = located[group[0]][0]
        begin = located[group[0]][1] // PAGE * PAGE
        end = max(located[k][1] + located[k][2] for k in group)
        length = (end - begin + PAGE - 1) // PAGE * PAGE
        runs.append(Run(path, begin, length, size, located[group[0]][3]))
        for k in group:
            where_in_buffer[k] = size + located[k][1] - begin
        size += length
    return runs, where_in_buffer, size


class Residency:
    """Whether a layer's mapped pages are all in the page cache: one `mincore` call per contiguous
    range into a vector allocated once, checked in C. Called on the compute thread (tens of
    microseconds), so the reader thread runs no Python while the compute thread needs the GIL."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        spans = sorted(
            (t.data_ptr() // PAGE * PAGE, t.data_ptr() + t.numel() * t.element_size())
            for t in tensors
            if t.numel()
        )
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.ranges = [(start, end - start) for start, end in merged]
        pages = max((n + PAGE - 1) // PAGE for _, n in self.ranges) if self.ranges else 0
        self.vec = (ctypes.c_uint8 * max(pages, 1))()

    def __call__(self) -> bool:
        for start, length in self.ranges:
            if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), self.vec) != 0:
                return False
            if ctypes.string_at(self.vec, (length + PAGE - 1) // PAGE).count(0):  # bit 0: resident
                return False
        return True


class PageStreamer(_Streamer):
    """CPU compute: cached layers run in place from mapped files; others are read ahead from disk."""

    def __init__(self, layers: Sequence[tuple[nn.Module, StreamedLayer]], prefetch: int) -> None:
        super().__init__(layers, prefetch)
        for slots in self.layers:
            for slot in slots:
                slot.bind(slot.host)
        self.reads = [plan_reads([s.host for s in slots]) for slots in self.layers]
        self.resident = [Residency([s.host for s in slots]) for slots in self.layers]
        self.size = max((r[2] for r in self.reads if r is not None), default=0)
        self.count = min(prefetch, len(self.layers) - 1) + 1
        self.buffers: list[torch.Tensor] = []  # allocated on the first read from disk
        self.fds: dict[tuple[str, bool], tuple[int, bool] | None] = {}  # (path, direct?) -> (fd, O_DIRECT?)
        self.missed: set[int] = set()  # layers found uncached once: read with O_DIRECT from now on
        self.pending: dict[int, tuple[int, Future[None]]] = {}  # layer -> (buffer, its read)
        self.owner: list[int | None] = [None] * self.count
        self.bound: dict[int, int] = {}  # layer -> buffer its modules now point into
        self.in_use: int | None = None
        self.next_buffer = 0

    def _buffer(self, index: int) -> torch.Tensor:
        while len(self.buffers) <= index:
            raw = torch.empty(self.size + PAGE, dtype=torch.uint8)
            skip = -raw.data_ptr() % PAGE  # O_DIRECT wants page-aligned memory
            self.buffers.append(raw[skip : skip + self.size])
        return self.buffers[index]

    def _fd(self, run: Run, direct: bool) -> tuple[int, bool] | None:
        """A read-only fd for `run.path`, with O_DIRECT if asked and the file system allows it;
        None when the path no longer holds the mapped file (replaced or deleted since)."""
        key = (run.path, direct)
        if key not in self.fds:
            fd, is_direct = None, False
            if direct and hasattr(os, "O_DIRECT"):
                with contextlib.suppress(OSError):  # a file system without O_DIRECT (tmpfs): plain reads
                    fd, is_direct = os.open(run.path, os.O_RDONLY | os.O_DIRECT), True
            if fd is None:
                with contextlib.suppress(OSError):  # deleted since it was mapped
                    fd = os.open(run.path, os.O_RDONLY)
            if fd is not None and os.fstat(fd).st_ino != run.inode:
                os.close(fd)
                fd = None
            self.fds[key] = (fd, is_direct) if fd is not None else None
        return self.fds[key]

    def _read(self, index: int, buffer: int) -> None:
        """Runs on the reader thread: fill `buffer` with layer `index` (not in the page cache).

        A layer's first miss is read through the page cache, so with RAM to spare it runs in place
        from the next token on. A second miss means memory is too tight to keep it cached: from then
        on its reads bypass the cache (O_DIRECT), sparing the kernel the reclaim they would cause.
        A layer whose file was replaced since it was mapped is copied from the mapping instead.
        """
        reads = self.reads[index]
        direct = index in self.missed
        self.missed.add(index)
        fds = [self._fd(run, direct) for run in reads[0]]
        if any(fd is None for fd in fds):
            base = self._buffer(buffer)
            for slot, offset in zip(self.layers[index], reads[1], strict=True):
                size = slot.host.numel() * slot.host.element_size()
                base[offset : offset + size].view(slot.host.dtype).view(slot.host.shape).copy_(slot.host)
            return
        view = memoryview(self._buffer(buffer).numpy())
        for run, (fd, is_direct) in zip(reads[0], fds, strict=True):
            done = 0
            while done < run.length:
                n = os.preadv(fd, [view[run.into + done : run.into + run.length]], run.offset + done)
                if n <= 0:
                    break  # end of file: the aligned range ran past it
                done += n
            if direct and not is_direct and hasattr(os, "posix_fadvise"):  # dropped after reading
                os.posix_fadvise(fd, run.offset, run.length, os.POSIX_FADV_DONTNEED)

    def _schedule(self, index: int) -> tuple[int, Future[None]]:
        for step in range(self.count):
            buffer = (self.next_buffer + step) % self.count
            if buffer != self.in_use:
                break
        self.next_buffer = (buffer + 1) % self.count
        previous = self.owner[buffer]
        if previous is not None and self.pending.get(previous, (None,))[0] == buffer:
            del self.pending[previous]  # read ahead but never run (out of order): read again when it runs
        self.owner[buffer] = index
        return buffer, self.pool.submit(self._read, index, buffer)

    def before(self, index: int) -> None:
        entry = self.pending.pop(index, None)
        if entry is None and self.reads[index] is not None and not self.resident[index]():
            entry = self._schedule(index)  # a miss nobody read ahead: read it now
        if entry is not None:
            buffer, future = entry
            future.result()
            _, offsets, _ = self.reads[index]
            base = self.buffers[buffer]
            for slot, offset in zip(self.layers[index], offsets, strict=True):
                size = slot.host.numel() * slot.host.element_size()
                slot.bind(
                    base[offset : offset + size].view(slot.host.dtype).view(slot.host.shape)
                )  # bytes -> tensor
            self.bound[index] = buffer
            self.in_use = buffer
        else:
            if self.bound.pop(index, None) is not None:
                for slot in self.layers[index]:
                    slot.bind(slot.host)
            self.in_use = None
        for nxt in self.upcoming(index):
            if nxt not in self.pending and self.reads[nxt] is not None and not self.resident[nxt]():
                self.pending[nxt] = self._schedule(nxt)

    def after(self, index: int) -> None:
        self.in_use = None

    def close(self) -> None:
        super().close()
        for entry in self.fds.values():
            if entry is not None:
                os.close(entry[0])
        self.fds.clear()
