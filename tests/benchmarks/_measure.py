"""Helpers every benchmark shares: timing a piece of work, and where the figures go."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest


def timed(work: Callable[[], object]) -> float:
    """Wall-clock seconds ``work()`` takes."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def against_baselines(
    rounds: Sequence[Mapping[str, float]], pairs: Mapping[str, tuple[str, str, str, float]]
) -> dict[str, dict[str, float | str]]:
    """Per label of ``pairs`` (label: (ours, baseline, unit, floor), figures that are rates):
    the medians over the rounds of ours and of its baseline, their ratio, the unit and the floor."""
    median = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    return {
        label: {
            "unit": unit,
            "value": median[ours],
            "baseline": median[base],
            "ratio": median[ours] / median[base],
            "floor": floor,
        }
        for label, (ours, base, unit, floor) in pairs.items()
    }


def write_report(report: object, file_name: str) -> None:
    """Write ``report`` as JSON to ``MESHAGENT_BENCH_OUT``, if set: a file path, or an existing
    directory that gets ``file_name``."""
    destination = os.environ.get("MESHAGENT_BENCH_OUT")
    if destination:
        path = Path(destination)
        if path.is_dir():
            path = path / file_name
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def print_uncaptured(pytestconfig: pytest.Config, text: str) -> None:
    """Print past pytest's capture, so module-scoped fixtures can show the table at teardown."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text, flush=True)
