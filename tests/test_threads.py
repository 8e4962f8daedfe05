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


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.7, 1), (1.2, 1), (9.0, 1)])
def test_default_leaves_busy_cores_alone(monkeypatch, load, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.idle_cores() == expected


def test_rejects_zero_threads():
    with pytest.raises(InvalidArgumentError):
        threads.configure_threads(0)
