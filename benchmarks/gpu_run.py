"""One prepared run for a machine with an NVIDIA GPU (at most 8 minutes, no network):

  1. train the digit CNN with the default recipe on CUDA (bf16 autocast, channels-last): seconds
     per epoch and test accuracy;
  2. export both models (the CNN from that checkpoint; ResNet-50 with random weights: speed does
     not depend on them), fp32, int8 and fp16, each validated;
  3. check that onnxruntime's CUDA provider really runs them: the provider is read back from the
     session and onnxruntime's profile names the provider of every node (a Conv/Gemm/MatMul on the
     CPU under --provider cuda is an error);
  4. benchmark PyTorch eager CUDA, onnxruntime CUDA fp32/fp16 and TensorRT (reported unavailable,
     with the reason, when its libraries are missing) over batch sizes up to where the GPU
     saturates, and the machine's own CPU engines, all in one run;
  5. tune: onnxruntime's CUDA options measured one at a time and together (fp16 I/O, prefer_nhwc,
     cuDNN search and workspace, device-resident IO binding, pinned buffers, CUDA graphs), against
     PyTorch at its best (fp16, channels_last, cudnn.benchmark, torch.compile max-autotune and
     reduce-overhead) at the same precision and batch (ferry.bench.gpu_tuning).

Everything lands in --out: summary.json, train/ (metrics, curves), bench/ (results.json,
report.md, plots). A backend that cannot run is reported as skipped, never replaced by the CPU.

  python -m ferry.bench.gpu_run --data-dir DIR_WITH_MNIST --out benchmarks/results/gpu-<card>
  python -m ferry.bench.gpu_run --data-dir ../shared/data --out /tmp/gpu-dry --dry-run   # anywhere

--dry-run runs the same steps on whatever device is there with tiny sizes, to check the script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _log(msg: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sample_images(folder: Path, n: int = 16) -> Path:
    """Calibration images for ResNet-50 int8 (random weights: only speed matters here): the shipped
    sample photos and seeded noise."""
    from PIL import Image

    from ferry.core.samples import sample_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(max(0, n - len(photos))):
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    return folder


def _nvidia_smi() -> dict:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cuda = next((ln.split("CUDA Version:")[1].split("|")[0].strip() for ln in header.splitlines() if "CUDA Version" in ln), None)
    fields = [f.strip() for f in out.splitlines()[0].split(",")] if out else []
    return {**dict(zip(query.split(","), fields)), "driver_cuda_version": cuda}


def main(argv: list[str] | None = None) -> int:
    from ferry.core.errors import FerryError

    try:
        return _run(argv)
    except FerryError as exc:
        print(f"gpu_run: error: {exc}", file=sys.stderr)
        return 2


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: the recipe's)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (checks the script)")
    args = parser.parse_args(argv)

    import torch

    from ferry.bench import matrix
    from ferry.bench.report import table, write_all
    from ferry.bench.suite import BenchConfig, run_benchmarks
    from ferry.core.errors import FerryError
    from ferry.core.machine import machine_info
    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.runtime import Classifier
    from ferry.train.config import TrainConfig
    from ferry.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        _log("no CUDA device: this script is for a GPU machine (use --dry-run to check it here)")
        return 2
    import onnxruntime

    summary: dict = {"dry_run": args.dry_run, "machine": machine_info(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
                     "gpu": torch.cuda.get_device_name(0) if cuda else None, "nvidia_smi": _nvidia_smi(),
                     "onnxruntime": {"version": onnxruntime.__version__, "file": onnxruntime.__file__,
                                     "providers": onnxruntime.get_available_providers()}}
    _log(f"device: {summary['gpu'] or 'CPU (dry run)'}; onnxruntime {onnxruntime.__version__} "
         f"providers {summary['onnxruntime']['providers']}")

    # 1. train
    cfg = TrainConfig(data_dir=args.data_dir, out=str(out / "train"), device="cuda" if cuda else "cpu")
    if args.epochs:
        cfg = TrainConfig(**{**cfg.to_dict(), "channels": tuple(cfg.channels), "epochs": args.epochs})
    metrics = train(cfg, progress=False, log=_log, dry_run=args.dry_run)
    summary["train"] = {"device": metrics["device"], "epochs": len(metrics["epochs"]),
                        "seconds_per_epoch": [round(r["seconds"], 2) for r in metrics["epochs"]],
                        "train_seconds": round(metrics["train_seconds"], 1), "prepare_seconds": round(metrics["prepare_seconds"], 1),
                        "autocast": "bf16" if cuda else None,
                        "test_accuracy": metrics["test_accuracy"], "test_images": metrics["test_images"]}
    _save(summary, out)

    # 2. export
    models = out / "models"
    ckpt = Path(cfg.out) / "checkpoint.pt"
    cnn = export_model(ExportOptions(model="mnist-cnn", out=str(models), checkpoint=str(ckpt), data_dir=args.data_dir,
                                     int8=True, fp16=True, int8_max_drop_pp=100.0 if args.dry_run else 0.1), log=_log)
    summary["export_cnn"] = {k: v.info.get("validation", v.info.get("accuracy_vs_fp32")) for k, v in cnn.metadata.items()}
    export_model(ExportOptions(model="resnet50", weights="none", out=str(models), int8=True, fp16=True,
                               calib_dir=str(_sample_images(out / "calib", 5 if args.dry_run else 20))), log=_log)

    # 3. where does each node run under --provider cuda
    summary["placement"] = {}
    for name in ("mnist-cnn.onnx", "mnist-cnn.fp16.onnx", "resnet50.onnx", "resnet50.fp16.onnx"):
        try:
            clf = Classifier.from_onnx(models / name, provider="cuda")
            summary["placement"][name] = {"provider": clf.provider.used, **(clf.provider.placement or {})}
        except FerryError as exc:
            summary["placement"][name] = {"error": str(exc)}
        _log(f"placement {name}: {summary['placement'][name]}")
    _save(summary, out)

    # 4. benchmark
    plan_cpu, plan_gpu = ("quick", "quick") if args.dry_run else ("default", "gpu")
    # the dry run checks the script, not every CPU engine (torch.compile alone would take half a minute)
    backends = ("torch-eager-cpu", "ort-cpu-fp32", "ort-cpu-int8", *[b.name for b in matrix.ALL_BACKENDS if b.device == "cuda"]) \
        if args.dry_run else tuple(matrix.BACKENDS)
    bcfg = BenchConfig(models_dir=str(models), checkpoint=str(ckpt), backends=backends,
                       batch_sizes={m: matrix.batch_sizes(m, plan_cpu) for m in matrix.DEFAULT_MODELS},
                       gpu_batch_sizes={m: matrix.batch_sizes(m, plan_gpu) for m in matrix.DEFAULT_MODELS},
                       min_seconds=0.2 if args.dry_run else 1.0, min_calls=10 if args.dry_run else 100,
                       max_seconds=2.0 if args.dry_run else 6.0, retries=0 if args.dry_run else 1,
                       min_rounds=3 if args.dry_run else 8, round_seconds=0.01 if args.dry_run else 0.05,
                       max_seconds_batch1=3.0 if args.dry_run else 60.0, max_seconds_offline=2.0 if args.dry_run else 20.0)
    results = run_benchmarks(bcfg, progress=_log)
    write_all(results, out / "bench")

    # 5. tuning: onnxruntime's CUDA options one at a time and together, against PyTorch at its best
    from ferry.bench.gpu_tuning import run as tune

    # (the dry run checks every path on the small model)
    tuned = tune(models, out / "tuning", model="mnist-cnn" if args.dry_run else "resnet50", dry_run=args.dry_run, log=_log)
    summary["tuning_best"] = tuned["best"]
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    _save(summary, out)
    print(table(results))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    _log(f"done in {summary['seconds']} s; results in {out}")
    return 0


def _save(summary: dict, out: Path) -> None:
    from ferry.core.fileio import write_json_atomic

    write_json_atomic(out / "summary.json", summary)


if __name__ == "__main__":
    sys.exit(main())
