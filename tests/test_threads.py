"""Thread-count policy: explicit counts win, the default never oversubscribes, never drops below 1."""

from __future__ import annotations

import os

import pytest
import torch

from lamina.engine import threads
from lamina.errors import InvalidArgumentError


def test_explicit_count_is_applied_and_restored():
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _Clock:
    """Stands in for the `time` module inside `threads`: sleeping advances the wall clock, and this
    process's CPU time reads the given values in turn."""

    def __init__(self, own_cpu_s: list[float]) -> None:
        self.now, self._own = 100.0, iter(own_cpu_s)

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return next(self._own)


def _machine(monkeypatch, cores: int, jiffies: list[tuple[int, int]], own_cpu_s: list[float]) -> None:
    """A machine with `cores` CPUs whose /proc/stat reads `jiffies` in turn, and this process's CPU times."""
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads, "_cpu_jiffies", iter(jiffies).__next__)
    monkeypatch.setattr(threads, "time", _Clock(own_cpu_s))


@pytest.mark.parametrize(
    ("busy_jiffies", "own_cpu_s", "expected"),
    [
        (0, 0.0, 2),  # idle machine
        (2, 0.0, 2),  # a neighbour using 0.1 of a core
        (8, 0.0, 1),  # 8 of 20 jiffies: a neighbour keeps 0.8 cores busy
        (20, 0.0, 1),  # both cores busy: still one thread
        (8, 0.08, 2),  # the 0.8 busy cores were this process itself
    ],
)
def test_default_counts_cores_busy_right_now(monkeypatch, busy_jiffies, own_cpu_s, expected):
    # 0.1 s on 2 cores at 100 Hz: 20 jiffies in all.
    _machine(monkeypatch, 2, [(1000, 5000), (1000 + busy_jiffies, 5020)], [3.0, 3.0 + own_cpu_s])
    assert threads.idle_cores() == expected


def test_a_recent_run_in_the_load_average_does_not_count(monkeypatch):
    """The 1-minute load average of 1.5 is a run that just ended; the CPUs are idle now."""
    _machine(monkeypatch, 2, [(1000, 5000), (1000, 5020)], [3.0, 3.0])
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert threads.idle_cores() == 2


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.7, 1), (1.2, 1), (9.0, 1)])
def test_load_average_stands_in_without_proc_stat(monkeypatch, load, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.idle_cores() == expected


def test_busy_cores_now_reads_this_machine():
    busy = threads.busy_cores_now(0.05)
    assert busy is not None and 0.0 <= busy <= os.cpu_count()


def test_rejects_zero_threads():
    with pytest.raises(InvalidArgumentError):
        threads.configure_threads(0)


def test_rejects_more_threads_than_usable_cores(monkeypatch):
    """100000 threads crash torch's thread pool (a segfault, no message); more than the cores only
    wait on each other."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    with pytest.raises(InvalidArgumentError, match=r"--threads 100000 is more than the 2 cores.*at most 2"):
        threads.configure_threads(100000)
    assert torch.get_num_threads() == before
