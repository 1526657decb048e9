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


# --- interleaved rounds: several backends compared side by side ------------------------------------


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(median, low, high): the median and its distribution-free ~95% confidence interval from order
    statistics (the ranks n/2 -+ z*sqrt(n)/2). With fewer than 6 values the interval is the range."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        raise ValueError("median of no values")
    med = percentile(v, 50)
    if n < 6:
        return med, v[0], v[-1]
    half = z * (n ** 0.5) / 2
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(-(-(n / 2 + half) // 1)))
    return med, v[lo], v[hi]


def relative_halfwidth(values: Sequence[float]) -> float:
    med, lo, hi = median_ci(values)
    return (hi - lo) / 2 / med if med else float("inf")


@dataclass(frozen=True)
class Rounds:
    """Interleaved rounds: each round ran every backend in turn (the order rotating), so machine
    noise and drift hit all of them alike. Per backend: every timed call, and each round's median."""

    latencies: dict[str, tuple[float, ...]]
    round_medians: dict[str, tuple[float, ...]]
    batch_size: int
    seconds: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.round_medians.values()), ()))

    def timing(self, name: str, target: float) -> Timing:
        """One backend's calls as a Timing; stable when its median's ~95% interval over the rounds
        is within +-`target` of it."""
        spread = relative_halfwidth(self.round_medians[name]) if self.rounds else float("nan")
        return Timing(self.latencies[name], self.batch_size, spread <= target, spread, attempts=1)

    def ratio(self, slow: str, fast: str) -> tuple[float, float, float]:
        """`slow`'s latency over `fast`'s: the median of the per-round ratios and its ~95% interval.
        Above 1: `fast` is faster."""
        per_round = [self.round_medians[slow][i] / self.round_medians[fast][i] for i in range(self.rounds)]
        return median_ci(per_round)


def measure_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    batch_size: int,
    warmup: int = 5,
    settle: int = 2,
    round_seconds: float = 0.05,
    min_round_calls: int = 3,
    min_rounds: int = 8,
    max_rounds: int = 1000,
    max_seconds: float = 60.0,
    target: float = 0.03,
    pairs: Sequence[tuple[str, str]] = (),
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Rounds:
    """Time every backend of `calls` in rounds until the comparisons have converged: after at least
    `min_rounds` (always made), stop when every backend's median and every ratio of `pairs` is known
    within +-`target` (their ~95% intervals over the rounds), or when `max_seconds` or `max_rounds`
    are reached. In a round each backend first makes `settle` untimed calls (the previous backend's
    threads go quiet), then timed calls until it has `min_round_calls` and `round_seconds`."""
    names = list(calls)
    if not names:
        raise ValueError("nothing to measure")
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    sync()
    latencies: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    start = clock()
    for r in range(max_rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = calls[name]
            for _ in range(settle):
                fn()
            sync()
            these: list[float] = []
            spent = 0.0
            while len(these) < min_round_calls or spent < round_seconds:
                t0 = clock()
                fn()
                sync()
                dt = clock() - t0
                these.append(dt)
                spent += dt
            latencies[name] += these
            medians[name].append(percentile(these, 50))
        done = r + 1 >= min_rounds and all(relative_halfwidth(m) <= target for m in medians.values())
        if done and pairs:
            current = Rounds({n: tuple(v) for n, v in latencies.items()}, {n: tuple(v) for n, v in medians.items()},
                             batch_size, clock() - start)
            for slow, fast in pairs:
                med, lo, hi = current.ratio(slow, fast)
                done = done and (hi - lo) / 2 / med <= target
        if done or (r + 1 >= min_rounds and clock() - start >= max_seconds):
            break
    return Rounds({n: tuple(v) for n, v in latencies.items()}, {n: tuple(v) for n, v in medians.items()}, batch_size,
                  clock() - start)
