"""`run_benchmarks(config)`: every (model, backend) pair, single-stream and offline, in one run.

CPU backends of a model (PyTorch eager and torch.compile, onnxruntime, OpenVINO, and ferry's own
`auto` choice) are measured side by side: all of them loaded, then timed in interleaved rounds
(each round runs every backend in turn, in a rotating order, after a few untimed calls that let the
previous backend's threads go quiet), so machine noise and drift hit all alike and every ratio
comes from rounds of the same run. Rounds go on until every median and every ratio the report
gives is known within +-3% (a ~95% interval over the rounds) or a time cap is reached: a
sub-millisecond row is measured longer, not given up. GPU backends are measured one at a time
afterwards. Rows that cannot run are recorded as skipped with the reason. onnxruntime's intra-op
spinning stays at its default, as users get it.
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
from ferry.bench.harness import Rounds, Timing, measure_interleaved, measure_stable, median_ci
from ferry.core.machine import machine_info

RESULTS_SCHEMA = "ferry.bench/3"


@dataclass
class BenchConfig:
    """What to measure and for how long."""

    models_dir: str = "models"
    models: tuple[str, ...] = matrix.DEFAULT_MODELS
    backends: tuple[str, ...] = tuple(matrix.BACKENDS)
    batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per model; default: the matrix's
    gpu_batch_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per model, GPU backends (default: batch_sizes)
    checkpoint: str | dict[str, str] | None = None  # for the PyTorch baselines: mnist-cnn's path, or model -> path
    threads: int = 0  # intra-op threads for torch, onnxruntime and OpenVINO (0: their defaults, read back)
    min_seconds: float = 2.0  # GPU rows: per measurement
    min_calls: int = 50  # GPU rows: per single-stream measurement (offline: 10)
    max_seconds: float = 20.0  # GPU rows: stops a long measurement, never before its minimum number of calls
    warmup: int = 5
    retries: int = 2  # GPU rows: re-measurements of a noisy row before it is reported as unstable
    seed: int = 0
    # interleaved CPU rounds
    min_rounds: int = 8
    round_seconds: float = 0.05  # each backend's timed share of a round (at least 3 calls)
    target: float = 0.03  # a median or ratio is known when its ~95% interval is within +-3%
    max_seconds_batch1: float = 90.0  # per model: the cap on the single-stream rounds
    max_seconds_offline: float = 30.0  # per model and batch size
    compile_all_batches: bool = not matrix.COMPILE_BATCH_ONE_ONLY


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


def prepare_backend(spec: matrix.BackendSpec, model: str, cfg: BenchConfig) -> bk.Prepared:
    threads = cfg.threads or None
    if spec.engine in ("torch", "torch-compile"):
        ck = cfg.checkpoint.get(model) if isinstance(cfg.checkpoint, dict) else (cfg.checkpoint if model == "mnist-cnn" else None)
        return bk.prepare_torch(spec, model, ck, threads=threads,
                                models_dir=cfg.models_dir)
    return bk.prepare_runtime(spec, model, Path(cfg.models_dir), threads=threads)


def bench_machine() -> dict[str, Any]:
    return {**machine_info(), "gpu": bk.gpu_name()}


def run_benchmarks(cfg: BenchConfig, *, progress: Callable[[str], None] = lambda _m: None,
                   prepare: Callable[[matrix.BackendSpec, str, BenchConfig], bk.Prepared] = prepare_backend) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    rounds: dict[tuple[str, int], Rounds] = {}
    machine = bench_machine()
    plan = {m: tuple(cfg.batch_sizes.get(m) or matrix.batch_sizes(m, shape=matrix.input_shape(m, cfg.models_dir)))
            for m in cfg.models}
    for model in cfg.models:
        shape = matrix.input_shape(model, cfg.models_dir)
        specs = [matrix.BACKENDS[n] for n in cfg.backends]
        cpu = [s for s in specs if s.device != "cuda"]
        gpu = [s for s in specs if s.device == "cuda"]
        prepared: dict[str, bk.Prepared] = {}
        for spec in cpu:
            progress(f"{model} / {spec.name}: loading")
            try:
                prepared[spec.name] = prepare(spec, model, cfg)
            except bk.Unavailable as exc:
                skipped.append({"model": model, "backend": spec.name, "reason": str(exc)})
        try:
            if prepared:
                group = _measure_interleaved(prepared, model, shape, plan[model], cfg, machine, progress, skipped)
                rows += group["rows"]
                rounds.update({(model, b): r for b, r in group["rounds"].items()})
        finally:
            for p in prepared.values():
                p.close()
            prepared.clear()
            gc.collect()
        for spec in gpu:  # one GPU backend alive at a time
            progress(f"{model} / {spec.name}: loading")
            try:
                one = prepare(spec, model, cfg)
            except bk.Unavailable as exc:
                skipped.append({"model": model, "backend": spec.name, "reason": str(exc)})
                continue
            try:
                batches = cfg.gpu_batch_sizes.get(model, plan[model])
                rows.extend(_measure_backend(one, model, shape, batches, cfg, machine, progress))
            finally:
                one.close()
                del one
                gc.collect()
    overhead = []
    if "ort-cpu-fp32" in cfg.backends:
        from ferry.bench.overhead import measure_overhead

        progress("runtime overhead (Classifier end to end vs the engine's own call)")
        overhead = [r for r in measure_overhead(cfg.models_dir, threads=cfg.threads or None) if r["model"] in cfg.models]
    ratio_rows, left_out = ratios(rows, rounds)
    return {
        "schema": RESULTS_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": {**asdict(cfg), "batch_sizes": {m: list(b) for m, b in plan.items()},
                   "gpu_batch_sizes": {m: list(b) for m, b in cfg.gpu_batch_sizes.items()}},
        "notes": [
            "ResNet-50 and, without --checkpoint, the digit CNN use random weights: speed does not depend on them.",
            "Inputs are fixed, seeded random tensors; preprocessing is not timed (the runtime-overhead rows time it). "
            "Every backend takes a host (numpy) batch and returns host logits: GPU rows include the copies in and out, "
            "for PyTorch and onnxruntime alike.",
            "CPU backends are measured side by side in interleaved rounds (each round runs every backend in turn, in a "
            f"rotating order, after {2} untimed calls each); at least {cfg.min_rounds} rounds, until every median and ratio is "
            f"known within +-{cfg.target:.0%} (a ~95% interval over the rounds) or the time cap "
            f"({cfg.max_seconds_batch1:g} s at batch 1, {cfg.max_seconds_offline:g} s per larger batch) is reached. A row "
            "whose median is not known within that is marked unstable; ratios give their interval either way.",
            f"GPU backends are measured one at a time: {cfg.warmup} warm-up calls, then at least {cfg.min_calls} calls "
            f"(batch 1) or 10 calls and {cfg.min_seconds:g} s; a noisy row is measured up to {cfg.retries} more times.",
            "torch.compile (inductor) is compiled for single-stream (batch 1); each new batch size would compile "
            "again" + (" (compiled for every batch size in this run)" if cfg.compile_all_batches else "") + ".",
        ],
        "rows": rows,
        "skipped": skipped,
        "ratios": ratio_rows,
        "ratios_left_out": left_out,
        "checks": checks(rows, rounds, machine),
        "overhead": overhead,
    }


def _common(prepared: bk.Prepared, model: str, machine: dict[str, Any]) -> dict[str, Any]:
    spec = prepared.spec
    return {
        "model": model, "backend": spec.name, "engine": spec.engine, "precision": prepared.precision or spec.precision,
        "provider": prepared.provider_used, "device": prepared.device_name, "threads": prepared.threads,
        "placement": prepared.detail, "session_load_s": prepared.load_seconds, "first_inference_ms": prepared.first_ms,
        "cpu": machine["cpu"], "cpu_class": machine["cpu_class"], "cpu_flags": machine["cpu_flags"],
        "cpu_count": machine["logical_cpus"], "versions": machine["versions"],
    }


def _row(common: dict[str, Any], batch: int, timing: Timing, **extra: Any) -> dict[str, Any]:
    return {**common, "scenario": "single-stream" if batch == 1 else "offline", "batch_size": batch,
            "calls": timing.calls, "seconds": timing.total_seconds, **timing.summary_ms(),
            "throughput_ips": timing.throughput, "stable": timing.stable, "stability_spread": timing.stability_spread,
            "attempts": timing.attempts, **extra}


def _first_call(prepared: bk.Prepared, x: np.ndarray) -> None:
    t0 = time.perf_counter()
    prepared.run(x)
    prepared.sync()
    prepared.first_ms = 1e3 * (time.perf_counter() - t0)


def _measure_interleaved(prepared: dict[str, bk.Prepared], model: str, shape: tuple[int, ...], batches: tuple[int, ...],
                         cfg: BenchConfig, machine: dict[str, Any], progress: Callable[[str], None],
                         skipped: list[dict[str, str]]) -> dict[str, Any]:
    x1 = _inputs(shape, 1, cfg.seed)
    for p in prepared.values():
        _first_call(p, x1)
    commons = {name: _common(p, model, machine) for name, p in prepared.items()}
    out_rows, out_rounds = [], {}
    for batch in batches:
        group = {n: p for n, p in prepared.items()
                 if batch == 1 or cfg.compile_all_batches or p.spec.engine != "torch-compile"}
        for n in set(prepared) - set(group):
            skipped.append({"model": model, "backend": n, "batch_size": batch,
                            "reason": f"torch.compile is compiled for batch 1 only (batch {batch} would compile again)"})
        progress(f"{model}: batch {batch}, {len(group)} backends in interleaved rounds")
        x = x1 if batch == 1 else _inputs(shape, batch, cfg.seed + batch)
        pairs = [(slow, fast) for fast, slow, _ in matrix.RATIO_PAIRS if fast in group and slow in group] if batch == 1 else []
        result = measure_interleaved(
            {n: (lambda p=p: p.run(x)) for n, p in group.items()}, batch_size=batch, warmup=cfg.warmup,
            round_seconds=cfg.round_seconds, min_round_calls=3 if batch == 1 else 1,
            min_rounds=cfg.min_rounds if batch == 1 else max(3, cfg.min_rounds // 2), target=cfg.target, pairs=pairs,
            max_seconds=cfg.max_seconds_batch1 if batch == 1 else cfg.max_seconds_offline)
        out_rounds[batch] = result
        promised = (cfg.min_rounds * 3) if batch == 1 else max(3, cfg.min_rounds // 2)
        for n in group:
            out_rows.append(_row(commons[n], batch, result.timing(n, cfg.target), rounds=result.rounds, min_calls=promised,
                                 round_medians_ms=[round(1e3 * m, 5) for m in result.round_medians[n]]))
    return {"rows": out_rows, "rounds": out_rounds}


def _measure_backend(prepared: bk.Prepared, model: str, shape: tuple[int, ...], batches: tuple[int, ...],
                     cfg: BenchConfig, machine: dict[str, Any], progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One backend alone (the GPU ones): measure_stable per batch size."""
    _first_call(prepared, _inputs(shape, 1, cfg.seed))
    common = _common(prepared, model, machine)
    rows = []
    for batch in batches:
        progress(f"{model} / {prepared.spec.name}: batch {batch}")
        x = _inputs(shape, batch, cfg.seed + batch)
        timing = measure_stable(lambda: prepared.run(x), retries=cfg.retries, batch_size=batch, warmup=cfg.warmup,
                                min_calls=cfg.min_calls if batch == 1 else 10, min_seconds=cfg.min_seconds,
                                max_seconds=cfg.max_seconds, sync=prepared.sync)
        rows.append(_row(common, batch, timing, min_calls=cfg.min_calls if batch == 1 else 10))
    return rows


def _find(rows: list[dict], model: str, backend: str, batch: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["backend"] == backend and r["batch_size"] == batch), None)


def ratios(rows: list[dict], rounds: dict[tuple[str, int], Rounds] | None = None
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Speed-ups from rows of this run: at batch 1, from the interleaved rounds where both backends
    ran (the median of the per-round ratios and its ~95% interval), else from the two rows' p50
    (the GPU rows, measured apart; both must be stable); and peak throughput over the stable rows.
    Returns (ratios, comparisons left out and why)."""
    rounds = rounds or {}
    out, left_out = [], []
    for model in sorted({r["model"] for r in rows}):
        for fast, slow, label in matrix.RATIO_PAIRS:
            a, b = _find(rows, model, fast, 1), _find(rows, model, slow, 1)
            if not (a and b):
                continue
            group = rounds.get((model, 1))
            if group is not None and fast in group.round_medians and slow in group.round_medians:
                speedup, lo, hi = group.ratio(slow, fast)
                how = f"{group.rounds} interleaved rounds"
            else:
                noisy = [r["backend"] for r in (a, b) if not r["stable"]]
                if noisy:
                    left_out.append({"model": model, "comparison": label, "reason": f"batch-1 row of {', '.join(noisy)} unstable"})
                    continue
                speedup, lo, hi = b["p50_ms"] / a["p50_ms"], float("nan"), float("nan")
                how = "p50 of two rows measured apart"
            peaks = {}
            for backend in (fast, slow):
                stable = [r["throughput_ips"] for r in rows if r["model"] == model and r["backend"] == backend and r["stable"]]
                peaks[backend] = max(stable) if stable else float("nan")
            out.append({"model": model, "comparison": label, "fast": fast, "slow": slow, "batch1_p50_speedup": speedup,
                        "batch1_ci": [lo, hi], "from": how, "peak_throughput_speedup": peaks[fast] / peaks[slow]})
    return out, left_out


def verdict(value: float, lo: float, hi: float, factor: float) -> str:
    """A check's verdict from its ratio's median and ~95% interval: met (the whole interval within the
    factor), met within noise (the median within it, the interval crossing it), within noise (the
    interval crosses it, the median beyond it: not shown to be slower), not met (the whole interval
    beyond it). (`checks` judges a subject that runs the same engine as one of the others by that
    engine's row.)"""
    if hi <= factor:
        return "met"
    if value <= factor:
        return "met within noise"
    return "within noise" if lo <= factor else "not met"


def checks(rows: list[dict], rounds: dict[tuple[str, int], Rounds], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """matrix.CHECKS for this CPU's class, at batch 1, from the interleaved rounds: the subject's
    latency over that of each of the others (the median of the per-round ratios and its ~95%
    interval), checked against the fastest of them over the run: the one with the largest ratio (the
    verdict: `verdict`; every other's ratio is kept beside it). Not over the per-round minimum of the
    others: when two engines tie, the faster of two noisy equals in each round sits below both
    engines' own level, a bar no single engine, however chosen, clears. A subject that runs the same
    engine, precision and threads (read back) as one of the others, its median within
    `SAME_ENGINE_SPREAD` of that row's either way, may be judged by that engine's row against the
    fastest (was the choice right?) where that reads better than its own; the subject's own ratio
    is kept beside it, with why."""
    has_bf16 = any(f in machine.get("cpu_flags", []) for f in ("avx512_bf16", "amx_bf16"))
    out = []
    for model in sorted({r["model"] for r in rows}):
        group = rounds.get((model, 1))
        for c in matrix.CHECKS:
            applies = c.cpu_classes == "all" or (c.cpu_classes == "bf16") == has_bf16
            if not applies:
                out.append({"model": model, "check": c.name, "verdict": "not measured",
                            "why": f"applies to CPUs {'with' if c.cpu_classes == 'bf16' else 'without'} bf16; this is {machine.get('cpu_class')}"})
                continue
            against = [a for a in c.against if group is not None and a in group.round_medians]
            if group is None or c.subject not in group.round_medians or not against:
                missing = [n for n in (c.subject, *c.against) if group is None or n not in group.round_medians]
                out.append({"model": model, "check": c.name, "verdict": "not measured",
                            "why": f"not in this run: {', '.join(missing)}"})
                continue
            each = {a: group.ratio(c.subject, a) for a in against}
            fastest = max(against, key=lambda a: each[a][0])
            value, lo, hi = each[fastest]
            row = {"model": model, "check": c.name, "verdict": verdict(value, lo, hi, c.factor), "ratio": value, "ci": [lo, hi],
                   "factor": c.factor, "against": against, "fastest": fastest,
                   "each": {a: {"ratio": r, "ci": [r_lo, r_hi]} for a, (r, r_lo, r_hi) in each.items()}, "rounds": group.rounds}
            engine = _engine(rows, model, c.subject)
            twin = next((a for a in against if engine is not None and _engine(rows, model, a) == engine), None)
            if twin is not None and row["verdict"] != "met":
                t_value, t_lo, t_hi = group.ratio(c.subject, twin)
                if 1 / SAME_ENGINE_SPREAD <= t_value <= SAME_ENGINE_SPREAD:  # the two sessions run alike
                    choice, c_lo, c_hi = group.ratio(twin, fastest)
                    judged = verdict(choice, c_lo, c_hi, c.factor)
                    if t_hi > SAME_ENGINE_SPREAD and _RANK[judged] > _RANK["met within noise"]:
                        judged = "met within noise"  # its own session may be more than the spread slower
                    if _RANK[judged] > _RANK[row["verdict"]]:  # the twin's row can only speak for the subject
                        row.update(verdict=judged, choice_ratio=choice, choice_ci=[c_lo, c_hi],
                                   why=f"runs the same engine as {twin} ({', '.join(map(str, engine))}, read back): "
                                       f"judged by that engine against {fastest}, x{choice:.3f} ({c_lo:.3f}-{c_hi:.3f}); "
                                       f"its own session against {twin}'s x{t_value:.3f} ({t_lo:.3f}-{t_hi:.3f})")
            out.append(row)
    return out


# Two sessions of one engine in one process differ by a few per cent either way in a noisy run
# (placement, caches): where the subject's median against its twin stays within this factor either
# way, the twin's row may speak for it (never to its harm); when that interval reaches beyond the
# factor, at most "met within noise".
SAME_ENGINE_SPREAD = 1.05
_RANK = {"not met": 0, "within noise": 1, "met within noise": 2, "met": 3}


def _engine(rows: list[dict], model: str, backend: str) -> tuple[str, str, int] | None:
    """(provider, precision, threads) read back for `backend`'s batch-1 row of `model`; None without that
    row or any of the three."""
    row = next((r for r in rows if r["model"] == model and r.get("backend") == backend and r.get("batch_size") == 1), None)
    if row is None or not all(row.get(k) for k in ("provider", "precision", "threads")):
        return None
    return row["provider"], row["precision"], row["threads"]


__all__ = ["BenchConfig", "checks", "verdict", "median_ci", "prepare_backend", "ratios", "run_benchmarks"]
