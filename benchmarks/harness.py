"""Timing arithmetic and the measurement loop, independent of any backend.

After MLPerf Inference: single-stream (batch 1, one query after another: p50/p90/p99 latency)
and offline (images per second at a batch size). Warm-up is excluded; each timed call is
bracketed by the backend's `sync` (torch.cuda.synchronize on CUDA); a stability check compares
the medians of the last three windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default 'linear' method), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Seconds per call of `calls` timed calls of `batch_size` images each."""

    latencies: tuple[float, ...]
    batch_size: int
    stable: bool
    stability_spread: float  # (max - min) / min of the last three window medians

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def total_seconds(self) -> float:
        return sum(self.latencies)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def throughput(self) -> float:
        """Images per second over all timed calls."""
        return self.calls * self.batch_size / self.total_seconds

    def summary_ms(self) -> dict[str, float]:
        return {
            "p50_ms": 1e3 * self.p(50),
            "p90_ms": 1e3 * self.p(90),
            "p99_ms": 1e3 * self.p(99),
            "mean_ms": 1e3 * self.total_seconds / self.calls,
            "min_ms": 1e3 * min(self.latencies),
        }


def stability(latencies: Sequence[float], windows: int = 5, tolerance: float = 0.10) -> tuple[bool, float]:
    """Split the run into `windows` windows; stable when the medians of the last three are
    within `tolerance` of each other."""
    n = len(latencies)
    size = n // windows
    if size < 3:
        return False, float("nan")
    last = [latencies[n - (k + 1) * size : n - k * size] for k in range(3)]
    medians = [percentile(w, 50) for w in last]
    spread = (max(medians) - min(medians)) / min(medians)
    return spread <= tolerance, spread


def measure(
    call: Callable[[], object],
    *,
    batch_size: int,
    warmup: int = 3,
    min_calls: int = 30,
    min_seconds: float = 2.0,
    max_seconds: float = 30.0,
    max_calls: int = 100_000,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time `call` after `warmup` untimed calls until both `min_calls` and `min_seconds` are
    reached (or `max_seconds`/`max_calls`). `sync` runs before each clock read (GPU)."""
    for _ in range(warmup):
        call()
    sync()
    latencies: list[float] = []
    spent = 0.0
    while len(latencies) < max_calls and (len(latencies) < min_calls or spent < min_seconds) and spent < max_seconds:
        t0 = clock()
        call()
        sync()
        dt = clock() - t0
        latencies.append(dt)
        spent += dt
    ok, spread = stability(latencies)
    return Timing(tuple(latencies), batch_size, ok, spread)
