"""Benchmark exported models on this machine: PyTorch (eager and torch.compile) against the runtime's
engines, onnxruntime (fp32, int8; CUDA fp32/fp16 and TensorRT when present) and OpenVINO (f32, int8,
bf16 where the CPU has it), and ferry's own `auto` choice; single-stream latency (p50/p90/p99,
batch 1) and offline throughput over batch sizes. CPU backends are timed side by side in
interleaved rounds until every ratio is known within +-3%; the report checks ferry's engine choice
against the fastest alternative. Writes results.json, report.md and plots; a backend that cannot
run is listed as skipped with the reason, never replaced by another.

  ferry bench --models-dir models --out benchmarks/results/cpu"""

from __future__ import annotations

import argparse
import math
import sys

from ferry.core.errors import FerryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.bench.matrix import BACKENDS, DEFAULT_MODELS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--models-dir", default="models", help="folder of <model>.onnx / .int8.onnx / .fp16.onnx (default: models)")
    parser.add_argument("--out", default="bench", help="output folder for results.json, report.md, plots (default: bench)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                        help=f"model names in --models-dir (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS), metavar="BACKEND",
                        help=f"subset of: {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--cnn-batches", type=int, nargs="+", metavar="B", help="digit-CNN batch sizes (default: 1 8 32 128 256 1024)")
    parser.add_argument("--resnet-batches", type=int, nargs="+", metavar="B", help="ResNet-50 batch sizes (default: 1 8 32)")
    parser.add_argument("--checkpoint", action="append", metavar="[MODEL=]PATH",
                        help="a checkpoint for a PyTorch baseline: PATH for mnist-cnn, MODEL=PATH for another model, "
                             "e.g. digits=runs/digits/checkpoint.pt (repeatable; default: the CNN with random weights, "
                             "a trained detector without a baseline)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for torch and onnxruntime (default: all cores)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="GPU rows: minimum timed seconds per measurement (default: 2)")
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help="CPU rows: the cap on a model's interleaved single-stream rounds, in seconds (default: 90)")
    parser.add_argument("--compile-all-batches", action="store_true",
                        help="torch.compile every batch size (default: batch 1 only; each size compiles again)")
    parser.add_argument("--quick", action="store_true", help="short measurements and few batch sizes (a smoke test, noisy)")


def checkpoints(given: list[str] | None) -> str | dict[str, str] | None:
    """--checkpoint values -> BenchConfig.checkpoint: one bare PATH (mnist-cnn's), or model -> path."""
    if not given:
        return None
    from pathlib import Path

    def named(item: str) -> bool:  # MODEL=PATH; a path with "=" in it stays a path
        model, sep, _ = item.partition("=")
        return bool(sep) and "/" not in model and not Path(item).exists()

    if len(given) == 1 and not named(given[0]):
        return given[0]
    out: dict[str, str] = {}
    for item in given:
        model, _, path = item.partition("=")
        if not named(item):
            model, path = "mnist-cnn", item
        if not model or not path:
            raise FerryError(f"--checkpoint {item!r}: give PATH (mnist-cnn's) or MODEL=PATH")
        out[model] = path
    return out


def models_in(models_dir: str) -> list[str]:
    """The models of a model set: the names of its files (fp32, int8, fp16) in `models_dir`."""
    from pathlib import Path

    from ferry.runtime.contract import PRECISIONS

    names = set()
    for path in Path(models_dir).glob("*.onnx"):
        stem = path.name[:-len(".onnx")]
        for precision in PRECISIONS[1:]:
            stem = stem.removesuffix(f".{precision}")
        names.add(stem)
    return sorted(names)


def check_models(models: list[str], models_dir: str) -> None:
    """Before any work: every model named has a file in `models_dir` (else every backend of it would
    only be skipped, and the report would have nothing of it)."""
    from ferry.runtime.contract import PRECISIONS, variant_path

    unknown = [m for m in dict.fromkeys(models) if not any(variant_path(models_dir, m, p).is_file() for p in PRECISIONS)]
    if unknown:
        known = models_in(models_dir)
        raise FerryError(f"--models: {', '.join(unknown)} not in {models_dir} ("
                         + (f"it has {', '.join(known)}" if known else "it has no models") + "): export "
                         f"{'them' if len(unknown) > 1 else 'it'} there first (ferry export ... --out {models_dir})")


def run(args: argparse.Namespace) -> int:
    from ferry.bench import matrix
    from ferry.bench.report import table, write_all
    from ferry.bench.suite import BenchConfig, run_benchmarks
    from ferry.core.errors import FerryError

    problems = []
    if any(b < 1 for b in (args.cnn_batches or []) + (args.resnet_batches or [])):
        problems.append("batch sizes must be >= 1")
    if args.threads < 0:
        problems.append(f"--threads must be >= 0 (got {args.threads})")
    for flag, value in (("--min-seconds", args.min_seconds), ("--max-seconds", args.max_seconds)):
        if not (math.isfinite(value) and value > 0):  # NaN or inf would lift the time cap of every measurement
            problems.append(f"{flag} must be a finite number > 0 (got {value:g})")
    if problems:
        raise FerryError("; ".join(problems))
    from pathlib import Path

    if not Path(args.models_dir).is_dir():
        raise FerryError(f"--models-dir {args.models_dir} does not exist: run `make demo`, or `ferry export ... --out "
                         f"{args.models_dir}` for each model")
    from ferry.core.fileio import check_folder_writable

    check_folder_writable(args.out, "--out")  # now, not after the whole benchmark
    if any(not b.startswith("torch-") for b in args.backends):  # PyTorch alone builds the model from its name
        check_models(args.models, args.models_dir)
    plan = "quick" if args.quick else "default"
    batches = {m: matrix.batch_sizes(m, plan, matrix.input_shape(m, args.models_dir)) for m in args.models}
    if args.cnn_batches:
        batches["mnist-cnn"] = tuple(args.cnn_batches)
    if args.resnet_batches:
        batches["resnet50"] = tuple(args.resnet_batches)
    cfg = BenchConfig(models_dir=args.models_dir, models=tuple(args.models), backends=tuple(args.backends),
                      batch_sizes=batches, checkpoint=checkpoints(args.checkpoint), threads=args.threads,
                      min_seconds=0.3 if args.quick else args.min_seconds, min_calls=10 if args.quick else 50,
                      warmup=2 if args.quick else 5, compile_all_batches=args.compile_all_batches,
                      min_rounds=3 if args.quick else 8, round_seconds=0.01 if args.quick else 0.05,
                      max_seconds_batch1=min(args.max_seconds, 5.0) if args.quick else args.max_seconds,
                      max_seconds_offline=2.0 if args.quick else 30.0)
    from ferry.core.progress import Progress

    gpu = sum(matrix.BACKENDS[b].device == "cuda" for b in cfg.backends)
    steps = sum(len(cfg.backends) + len(batches[m]) * (1 + gpu) for m in cfg.models) + 1
    bar = Progress(steps, desc="benchmarking")

    def progress(msg: str) -> None:
        bar.update()
        if not bar.enabled:
            print(f"  {msg}", file=sys.stderr)

    results = run_benchmarks(cfg, progress=progress)
    bar.close()
    print(table(results))
    paths = write_all(results, args.out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
