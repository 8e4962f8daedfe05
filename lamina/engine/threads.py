"""CPU thread settings for inference: how many intra-op threads torch uses.

A mat-vec of a small model splits into pieces of a few microseconds, and every op ends at an
OpenMP barrier. When another process holds a core, a thread of ours waits a whole scheduler time
slice for it at each barrier: measured here (2 vCPUs, load average 6-11), 2 threads ran the same
decode 3-10x slower than 1. So the default counts only the cores other processes leave free
(usable cores minus the 1-minute load average, at least 1); `--threads N` overrides it.
"""

from __future__ import annotations

import os

import torch

from lamina.errors import InvalidArgumentError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Usable cores not already kept busy by other processes (by the 1-minute load average), >= 1."""
    cores = usable_cores()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # load average unavailable
        busy = 0
    return max(1, min(cores, cores - busy))


def configure_threads(threads: int | None = None) -> int:
    """Use `threads` intra-op threads (default: the idle cores); returns the count in force."""
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    count = threads if threads is not None else idle_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
