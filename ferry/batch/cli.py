"""Predict a folder (or a glob, or a list of paths/URIs) of images on Ray Data, locally or on a
cluster, and write one Parquet row per input: path, index, label, probability, top_k, provider,
error (a detector: path, detections, count, width, height, provider, error). A bad file is a row with its error; the job checks that every input appears exactly once.

  ferry batch models/resnet50.int8.onnx photos/ --out results/          # a local Ray, started and stopped
  ferry batch model.onnx s3-paths.txt --out s3://bucket/out --address auto --gpus-per-worker 1

Needs Ray: pip install 'ferry[scale]'."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="an .onnx file written by `ferry export`")
    parser.add_argument("input", metavar="INPUT", help="a folder, a glob, or a text file listing paths/URIs (one per line)")
    parser.add_argument("--out", required=True, help="output folder for the Parquet files (must not exist or be empty)")
    parser.add_argument("--address", help="join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray)")
    parser.add_argument("--workers", type=int, default=0, help="actors in the pool (default: one per CPU, or per GPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="CPUs each actor reserves; its onnxruntime threads follow (default: share what reading leaves)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each actor reserves (selects CUDA)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default: 32)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates kept per image (default: 5)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="detectors: keep detections scoring at least this (default: 0.5)")
    parser.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--object-store-mb", type=int, default=256, help="local Ray's object store in MiB (default: 256)")


def run(args: argparse.Namespace) -> int:
    from ferry.batch.job import BatchOptions, run_batch
    from ferry.runtime.images import quiet_bomb_warnings

    quiet_bomb_warnings()
    summary = run_batch(BatchOptions(
        model=args.model, input=args.input, out=args.out, address=args.address, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size,
        top_k=args.top_k, provider=args.provider, object_store_mb=args.object_store_mb, min_score=args.min_score,
    ))
    print(summary.describe())
    return 1 if summary.failures else 0
