"""One prepared run for a machine with an NVIDIA GPU (at most 8 minutes, no network):

  1. train the digit CNN on CUDA for a couple of epochs (seconds per epoch, accuracy);
  2. export both models (CNN: fp32/int8/fp16 from that checkpoint; ResNet-50: random weights);
  3. benchmark GPU and CPU backends (`ferry bench`), writing everything to --out.

It needs PyTorch with CUDA and onnxruntime; with the onnxruntime CPU build (no onnxruntime-gpu)
the onnxruntime CUDA rows are reported as unavailable, never run on the CPU instead.

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
    """Calibration images for ResNet-50 int8: the repo's sample photos, else seeded noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    samples = Path(__file__).resolve().parents[1] / "samples" / "photos"
    photos = sorted(samples.glob("*.jpg")) if samples.is_dir() else []
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(max(0, n - len(photos))):
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    return folder


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
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (checks the script)")
    args = parser.parse_args(argv)

    import torch

    from ferry.bench.report import table, write_all
    from ferry.bench.suite import BenchConfig, run_benchmarks
    from ferry.core.fileio import write_json_atomic
    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.train.config import TrainConfig
    from ferry.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        _log("no CUDA device: this script is for a GPU machine (use --dry-run to check it here)")
        return 2
    summary: dict = {"dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name(0) if cuda else None}
    try:
        summary["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        summary["nvidia_smi"] = None
    import onnxruntime

    summary["onnxruntime"] = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    _log(f"device: {summary['gpu'] or 'CPU (dry run)'}; onnxruntime {onnxruntime.__version__} providers {summary['onnxruntime']['providers']}")

    # 1. train
    device = "cuda" if cuda else "cpu"
    cfg = TrainConfig(data_dir=args.data_dir, out=str(out / "train"), epochs=args.epochs, device=device)
    metrics = train(cfg, progress=False, log=_log, dry_run=args.dry_run)
    summary["train"] = {"device": metrics["device"], "epochs": len(metrics["epochs"]),
                        "seconds_per_epoch": [round(r["seconds"], 2) for r in metrics["epochs"]],
                        "test_accuracy": metrics["test_accuracy"], "test_images": metrics["test_images"]}

    # 2. export
    models = out / "models"
    ckpt = Path(cfg.out) / "checkpoint.pt"
    cnn = export_model(ExportOptions(model="mnist-cnn", out=str(models), checkpoint=str(ckpt), data_dir=args.data_dir,
                                     int8=True, fp16=True, int8_max_drop_pp=100.0 if args.dry_run else 0.1), log=_log)
    summary["export_cnn"] = {k: v.get("validation", v.get("accuracy_vs_fp32")) for k, v in cnn.metadata.items()}
    export_model(ExportOptions(model="resnet50", weights="none", out=str(models), int8=True, fp16=True,
                               calib_dir=str(_sample_images(out / "calib", 4 if args.dry_run else 16))), log=_log)

    # 3. benchmark
    from ferry.bench import matrix

    plan = "quick" if args.dry_run else "gpu"
    batches = {m: matrix.batch_sizes(m, plan) for m in matrix.DEFAULT_MODELS}
    bcfg = BenchConfig(models_dir=str(models), batch_sizes=batches, checkpoint=str(ckpt),
                       min_seconds=0.2 if args.dry_run else 1.0, min_calls=10 if args.dry_run else 100,
                       max_seconds=2.0 if args.dry_run else 8.0)
    results = run_benchmarks(bcfg, progress=_log)
    write_all(results, out / "bench")
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(out / "summary.json", summary)
    print(table(results))
    print(json.dumps(summary, indent=2))
    _log(f"done in {summary['seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
