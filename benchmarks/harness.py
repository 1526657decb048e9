"""Timing arithmetic and the measurement loop, independent of any backend.

After MLPerf Inference: single-stream (batch 1, one query after another: p50/p90/p99 latency)
and offline (images per second at a batch size). Warm-up is excluded; each timed call is
bracketed by the backend's `sync` (torch.cuda.synchronize on CUDA); a stability check compares
the medians of the last three windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's percentile (its default 'linear' method), q in [0, 100]."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class Timing:
    """Seconds per call of `calls` timed calls of `batch_size` images each."""

    latencies: tuple[float, ...]
    batch_size: int
    stable: bool
    stability_spread: float  # (max - min) / min of the last three window medians
    attempts: int = 1  # measurements made; more than one when earlier ones were noisy

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
    reached. `max_seconds` and `max_calls` stop a long measurement early, but never before
    `min_calls` calls: the number of calls the report promises is always honoured. `sync` runs
    before each clock read (GPU)."""
    if min_calls > max_calls:
        raise ValueError(f"min_calls {min_calls} > max_calls {max_calls}")
    for _ in range(warmup):
        call()
    sync()
    latencies: list[float] = []
    spent = 0.0
    while len(latencies) < min_calls or (spent < min_seconds and spent < max_seconds and len(latencies) < max_calls):
        t0 = clock()
        call()
        sync()
        dt = clock() - t0
        latencies.append(dt)
        spent += dt
    ok, spread = stability(latencies)
    return Timing(tuple(latencies), batch_size, ok, spread)


def measure_stable(call: Callable[[], object], *, retries: int = 2, **kwargs) -> Timing:
    """`measure`, repeated up to `retries` more times while the result is noisy. Returns the first
    stable measurement, or the least noisy one marked unstable (ratios then leave it out)."""
    tries: list[Timing] = []
    for _ in range(retries + 1):
        t = measure(call, **kwargs)
        tries.append(t)
        if t.stable:
            break
    best = next((t for t in tries if t.stable), None) or min(
        tries, key=lambda t: t.stability_spread if t.stability_spread == t.stability_spread else float("inf"))
    return Timing(best.latencies, best.batch_size, best.stable, best.stability_spread, attempts=len(tries))
