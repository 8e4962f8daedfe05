"""CPU thread settings for inference: how many intra-op threads torch uses.

On small machines the defaults can hurt: a mat-vec of a 135M model is split into pieces of a few
microseconds, and OpenMP threads that spin or that share a core with another busy process turn
that into milliseconds. The count is therefore set explicitly (all cores this process may use,
unless told otherwise) rather than left to the library.
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


def configure_threads(threads: int | None = None) -> int:
    """Use `threads` intra-op threads (default: every usable core); returns the count in force."""
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    count = threads if threads is not None else usable_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
