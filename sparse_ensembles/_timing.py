"""Timing of interchangeable calls, used where the library picks the faster of several executors
and where it reports latency."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, Mapping


def median_ms(calls: Mapping[Hashable, Callable[[], object]], repeats: int) -> dict:
    """Median milliseconds of each zero-argument call, after one warm-up call each, in interleaved
    rounds (so drifts of a shared machine hit every call alike)."""
    for f in calls.values():
        f()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}
