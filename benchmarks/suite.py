"""`run_benchmarks(config)`: every (model, backend) pair, single-stream and offline, in one run.

Rows that cannot run are recorded as skipped with the reason. Ratios are computed only from rows
of the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.bench import backends as bk
from ferry.bench import matrix
from ferry.bench.harness import measure
from ferry.core.machine import machine_info

RESULTS_SCHEMA = "ferry.bench/1"


@dataclass
class BenchConfig:
    """What to measure and for how long."""

    models_dir: str = "models"
    models: tuple[str, ...] = matrix.DEFAULT_MODELS
    backends: tuple[str, ...] = tuple(matrix.BACKENDS)
    batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per model; default: the matrix's
    checkpoint: str | None = None  # trained CNN for the PyTorch baseline (else random weights)
    threads: int = 0  # intra-op threads for torch and onnxruntime (0: all cores)
    min_seconds: float = 2.0  # per measurement
    min_calls: int = 50  # per single-stream measurement
    max_seconds: float = 20.0
    warmup: int = 5
    seed: int = 0


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


def prepare_backend(spec: matrix.BackendSpec, model: str, cfg: BenchConfig) -> bk.Prepared:
    threads = cfg.threads or None
    if spec.engine == "torch":
        return bk.prepare_torch(spec, model, cfg.checkpoint if model == "mnist-cnn" else None, threads=threads)
    return bk.prepare_ort(spec, model, Path(cfg.models_dir), threads=threads)


def run_benchmarks(cfg: BenchConfig, *, progress: Callable[[str], None] = lambda _m: None,
                   prepare: Callable[[matrix.BackendSpec, str, BenchConfig], bk.Prepared] = prepare_backend) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    machine = {**machine_info(), "cpu_count": machine_info()["logical_cpus"], "gpu": bk.gpu_name()}
    threads = cfg.threads or (machine["cpu_count"] or 1)
    for model in cfg.models:
        shape = matrix.input_shape(model, cfg.models_dir)
        batches = cfg.batch_sizes.get(model) or matrix.batch_sizes(model, shape=shape)
        for name in cfg.backends:
            spec = matrix.BACKENDS[name]
            progress(f"{model} / {name}: loading")
            try:
                prepared = prepare(spec, model, cfg)
            except bk.Unavailable as exc:
                skipped.append({"model": model, "backend": name, "reason": str(exc)})
                continue
            first_input = prepared.to_input(_inputs(shape, 1, cfg.seed))
            t0 = time.perf_counter()
            prepared.run(first_input)
            prepared.sync()
            first_ms = 1e3 * (time.perf_counter() - t0)
            common = {
                "model": model, "backend": name, "engine": spec.engine, "precision": spec.precision,
                "provider": prepared.provider_used, "device": prepared.device_name, "threads": threads,
                "session_load_s": prepared.load_seconds, "first_inference_ms": first_ms,
                "cpu": machine["cpu"], "cpu_count": machine["cpu_count"], "versions": machine["versions"],
            }
            for batch in batches:
                scenario = "single-stream" if batch == 1 else "offline"
                progress(f"{model} / {name}: batch {batch}")
                x = prepared.to_input(_inputs(shape, batch, cfg.seed + batch))
                timing = measure(lambda: prepared.run(x), batch_size=batch, warmup=cfg.warmup,
                                 min_calls=cfg.min_calls if batch == 1 else 10, min_seconds=cfg.min_seconds,
                                 max_seconds=cfg.max_seconds, sync=prepared.sync)
                rows.append({**common, "scenario": scenario, "batch_size": batch, "calls": timing.calls,
                             "seconds": timing.total_seconds, **timing.summary_ms(),
                             "throughput_ips": timing.throughput, "stable": timing.stable,
                             "stability_spread": timing.stability_spread})
    overhead = []
    if "ort-cpu-fp32" in cfg.backends:
        from ferry.bench.overhead import measure_overhead

        progress("runtime overhead (Classifier end to end vs session.run)")
        overhead = [r for r in measure_overhead(cfg.models_dir, threads=cfg.threads or None) if r["model"] in cfg.models]
    return {
        "schema": RESULTS_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": {**asdict(cfg), "batch_sizes": {m: list(cfg.batch_sizes.get(m) or matrix.batch_sizes(m)) for m in cfg.models}},
        "notes": [
            "ResNet-50 and, without --checkpoint, the digit CNN use random weights: speed does not depend on them.",
            "Inputs are fixed, seeded random tensors; preprocessing is not timed.",
            f"Each measurement: {cfg.warmup} warm-up calls excluded, then at least {cfg.min_calls} calls (batch 1) "
            f"or 10 calls, and at least {cfg.min_seconds:g} s.",
        ],
        "rows": rows,
        "skipped": skipped,
        "ratios": ratios(rows),
        "overhead": overhead,
    }


def _row(rows: list[dict], model: str, backend: str, batch: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["backend"] == backend and r["batch_size"] == batch), None)


def ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """Speed-ups from rows of this run: p50 latency at batch 1, and peak throughput."""
    pairs = matrix.RATIO_PAIRS
    out = []
    for model in sorted({r["model"] for r in rows}):
        for fast, slow, label in pairs:
            a, b = _row(rows, model, fast, 1), _row(rows, model, slow, 1)
            if a and b:
                peak_a = max(r["throughput_ips"] for r in rows if r["model"] == model and r["backend"] == fast)
                peak_b = max(r["throughput_ips"] for r in rows if r["model"] == model and r["backend"] == slow)
                out.append({"model": model, "comparison": label, "fast": fast, "slow": slow,
                            "batch1_p50_speedup": b["p50_ms"] / a["p50_ms"],
                            "peak_throughput_speedup": peak_a / peak_b})
    return out
