"""CPU thread settings for inference: how many intra-op threads torch uses.

A mat-vec of a small model splits into pieces of a few microseconds, and every op ends at an
OpenMP barrier. When another process holds a core, a thread of ours waits a whole scheduler time
slice for it at each barrier: measured here (2 vCPUs, load average 6-11), 2 threads ran the same
decode 3-10x slower than 1. So the default counts only the cores other processes leave free,
at least 1; `--threads N` overrides it.

"Free" is measured now, from /proc/stat over a tenth of a second, not from the 1-minute load
average: that average still counts a run that just ended, so a second `lamina` command within a
minute of the first took 1 thread on an idle 2-core machine (decode 42 vs 57 tok/s, prefill 300 vs
530 tok/s). Where /proc/stat is missing (not Linux), the load average stands in.
"""

from __future__ import annotations

import os
import time

import torch

from lamina.errors import InvalidArgumentError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


SAMPLE_S = 0.1  # how long `busy_cores_now` watches the CPUs


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in jiffies (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(value) for value in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def busy_cores_now(interval: float = SAMPLE_S) -> float | None:
    """How many cores other processes keep busy right now: the machine's busy share over `interval`
    times its cores, less this process's own CPU time. None where /proc/stat is unavailable."""
    before, own_before, started = _cpu_jiffies(), time.process_time(), time.perf_counter()
    if before is None:
        return None
    time.sleep(interval)
    after, own_s = _cpu_jiffies(), time.process_time() - own_before
    elapsed = time.perf_counter() - started  # the sleep can overshoot `interval`
    if after is None or after[1] <= before[1]:
        return None
    busy_share = (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, busy_share * (os.cpu_count() or 1) - own_s / elapsed)


def idle_cores() -> int:
    """Usable cores not kept busy by other processes right now (see module docstring), >= 1."""
    cores = usable_cores()
    busy = busy_cores_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # load average unavailable too
            busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def configure_threads(threads: int | None = None) -> int:
    """Use `threads` intra-op threads (default: the idle cores); returns the count in force. More
    threads than usable cores only wait on each other at every barrier (and a count in the tens of
    thousands crashes torch's thread pool), so that is refused."""
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    if threads is not None and threads > (cores := usable_cores()):
        raise InvalidArgumentError(
            f"--threads {threads} is more than the {cores} cores this process may use; "
            f"pass at most {cores}, or leave it out to use the idle ones"
        )
    count = threads if threads is not None else idle_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
