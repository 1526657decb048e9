"""`run_benchmarks(config)`: every (model, backend) pair, single-stream and offline, in one run.

Rows that cannot run are recorded as skipped with the reason. One backend is alive at a time: its
session is released before the next is created, because idle onnxruntime sessions in one process
keep their intra-op threads spinning and slow the session being timed (on a 2-core machine by
nearly 2x; docs: "Benchmarks"). Spinning stays at onnxruntime's default, as users get it. A noisy measurement is repeated; one that stays noisy is kept, marked
unstable and left out of the speed-up ratios. Ratios come only from rows of the same run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.bench import backends as bk
from ferry.bench import matrix
from ferry.bench.harness import measure_stable
from ferry.core.machine import machine_info

RESULTS_SCHEMA = "ferry.bench/2"


@dataclass
class BenchConfig:
    """What to measure and for how long."""

    models_dir: str = "models"
    models: tuple[str, ...] = matrix.DEFAULT_MODELS
    backends: tuple[str, ...] = tuple(matrix.BACKENDS)
    batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per model; default: the matrix's
    gpu_batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per model, GPU backends (default: batch_sizes)
    checkpoint: str | None = None  # trained CNN for the PyTorch baseline (else random weights)
    threads: int = 0  # intra-op threads for torch and onnxruntime (0: their defaults, read back)
    min_seconds: float = 2.0  # per measurement
    min_calls: int = 50  # per single-stream measurement (offline: 10)
    max_seconds: float = 20.0  # stops a long measurement, never before its minimum number of calls
    warmup: int = 5
    retries: int = 2  # re-measurements of a noisy row before it is reported as unstable
    seed: int = 0


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


def prepare_backend(spec: matrix.BackendSpec, model: str, cfg: BenchConfig) -> bk.Prepared:
    threads = cfg.threads or None
    if spec.engine == "torch":
        return bk.prepare_torch(spec, model, cfg.checkpoint if model == "mnist-cnn" else None, threads=threads,
                                models_dir=cfg.models_dir)
    return bk.prepare_ort(spec, model, Path(cfg.models_dir), threads=threads)


def bench_machine() -> dict[str, Any]:
    return {**machine_info(), "gpu": bk.gpu_name()}


def run_benchmarks(cfg: BenchConfig, *, progress: Callable[[str], None] = lambda _m: None,
                   prepare: Callable[[matrix.BackendSpec, str, BenchConfig], bk.Prepared] = prepare_backend) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    machine = bench_machine()
    plan = {m: tuple(cfg.batch_sizes.get(m) or matrix.batch_sizes(m, shape=matrix.input_shape(m, cfg.models_dir)))
            for m in cfg.models}
    for model in cfg.models:
        shape = matrix.input_shape(model, cfg.models_dir)
        for name in cfg.backends:
            spec = matrix.BACKENDS[name]
            progress(f"{model} / {name}: loading")
            try:
                prepared = prepare(spec, model, cfg)
            except bk.Unavailable as exc:
                skipped.append({"model": model, "backend": name, "reason": str(exc)})
                continue
            batches = cfg.gpu_batch_sizes.get(model, plan[model]) if spec.device == "cuda" else plan[model]
            try:
                rows.extend(_measure_backend(prepared, model, shape, batches, cfg, machine, progress))
            finally:
                del prepared  # one live session at a time (see the module docstring)
                gc.collect()
    overhead = []
    if "ort-cpu-fp32" in cfg.backends:
        from ferry.bench.overhead import measure_overhead

        progress("runtime overhead (Classifier end to end vs session.run)")
        overhead = [r for r in measure_overhead(cfg.models_dir, threads=cfg.threads or None) if r["model"] in cfg.models]
    ratio_rows, left_out = ratios(rows)
    return {
        "schema": RESULTS_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": {**asdict(cfg), "batch_sizes": {m: list(b) for m, b in plan.items()},
                   "gpu_batch_sizes": {m: list(b) for m, b in cfg.gpu_batch_sizes.items()}},
        "notes": [
            "ResNet-50 and, without --checkpoint, the digit CNN use random weights: speed does not depend on them.",
            "Inputs are fixed, seeded random tensors; preprocessing is not timed. Every backend takes a host "
            "(numpy) batch and returns host logits: GPU rows include the copies in and out, for PyTorch and onnxruntime alike.",
            f"Each measurement: {cfg.warmup} warm-up calls excluded, then at least {cfg.min_calls} calls (batch 1) "
            f"or 10 calls (larger batches), and at least {cfg.min_seconds:g} s (at most {cfg.max_seconds:g} s once "
            "the minimum number of calls is reached). Percentiles: numpy.",
            "Stability: the medians of the last three of five windows must agree within 10%; a noisy row is measured "
            f"up to {cfg.retries} more times, and if it stays noisy it is marked unstable and left out of the ratios.",
            "One backend is alive at a time (its session is released before the next is made); onnxruntime's "
            "intra-op spinning is left at its default.",
        ],
        "rows": rows,
        "skipped": skipped,
        "ratios": ratio_rows,
        "ratios_left_out": left_out,
        "overhead": overhead,
    }


def _measure_backend(prepared: bk.Prepared, model: str, shape: tuple[int, ...], batches: tuple[int, ...],
                     cfg: BenchConfig, machine: dict[str, Any], progress: Callable[[str], None]) -> list[dict[str, Any]]:
    spec = prepared.spec
    t0 = time.perf_counter()
    prepared.run(_inputs(shape, 1, cfg.seed))
    prepared.sync()
    first_ms = 1e3 * (time.perf_counter() - t0)
    common = {
        "model": model, "backend": spec.name, "engine": spec.engine, "precision": spec.precision,
        "provider": prepared.provider_used, "device": prepared.device_name, "threads": prepared.threads,
        "placement": prepared.detail, "session_load_s": prepared.load_seconds, "first_inference_ms": first_ms,
        "cpu": machine["cpu"], "cpu_class": machine["cpu_class"], "cpu_flags": machine["cpu_flags"],
        "cpu_count": machine["logical_cpus"], "versions": machine["versions"],
    }
    rows = []
    for batch in batches:
        progress(f"{model} / {spec.name}: batch {batch}")
        x = _inputs(shape, batch, cfg.seed + batch)
        timing = measure_stable(lambda: prepared.run(x), retries=cfg.retries, batch_size=batch, warmup=cfg.warmup,
                                min_calls=cfg.min_calls if batch == 1 else 10, min_seconds=cfg.min_seconds,
                                max_seconds=cfg.max_seconds, sync=prepared.sync)
        rows.append({**common, "scenario": "single-stream" if batch == 1 else "offline", "batch_size": batch,
                     "calls": timing.calls, "seconds": timing.total_seconds, **timing.summary_ms(),
                     "throughput_ips": timing.throughput, "stable": timing.stable,
                     "stability_spread": timing.stability_spread, "attempts": timing.attempts})
    return rows


def _row(rows: list[dict], model: str, backend: str, batch: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["backend"] == backend and r["batch_size"] == batch), None)


def ratios(rows: list[dict]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Speed-ups from stable rows of this run: p50 latency at batch 1, and peak throughput over the
    stable rows. Returns (ratios, comparisons left out because a row they need was unstable)."""
    out, left_out = [], []
    for model in sorted({r["model"] for r in rows}):
        for fast, slow, label in matrix.RATIO_PAIRS:
            a, b = _row(rows, model, fast, 1), _row(rows, model, slow, 1)
            if not (a and b):
                continue
            noisy = [r["backend"] for r in (a, b) if not r["stable"]]
            if noisy:
                left_out.append({"model": model, "comparison": label,
                                 "reason": f"batch-1 row of {', '.join(noisy)} unstable"})
                continue
            peaks = {}
            for backend in (fast, slow):
                stable = [r["throughput_ips"] for r in rows if r["model"] == model and r["backend"] == backend and r["stable"]]
                peaks[backend] = max(stable)
            out.append({"model": model, "comparison": label, "fast": fast, "slow": slow,
                        "batch1_p50_speedup": b["p50_ms"] / a["p50_ms"],
                        "peak_throughput_speedup": peaks[fast] / peaks[slow]})
    return out, left_out
