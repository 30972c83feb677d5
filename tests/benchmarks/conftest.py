"""Fixtures shared by the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def one_core() -> Iterator[str]:
    """Pin the process to one CPU for the measurement (Linux), then restore the affinity."""
    if not hasattr(os, "sched_getaffinity"):
        yield "not pinned"
        return
    original = os.sched_getaffinity(0)
    cpu = min(original)
    os.sched_setaffinity(0, {cpu})
    try:
        yield f"cpu {cpu}"
    finally:
        os.sched_setaffinity(0, original)
