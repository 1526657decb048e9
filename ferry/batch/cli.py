"""Predict a folder, a glob, a list of paths/URIs or an object-store prefix of images on Ray Data,
locally or on a cluster, and write one Parquet row per input (path, index, label, probability,
top_k, provider, error; a detector's: path, detections, count, width, height, provider, error) to a
local folder or an object store. A bad file is a row with its error.

Workers write the result files straight to --out; the job commits by writing _SUCCESS.json last
(files, row counts, the model's sha256, the inputs' count): read only what it lists. After a crash,
the same command with --resume keeps the finished parts and does the rest: every input once.

  ferry batch models/resnet50.int8.onnx photos/ --out results/        # a local Ray, started and stopped
  ferry batch model.onnx s3://bucket/photos/ --out s3://bucket/results/ --address auto
  ferry batch model.onnx s3://bucket/photos/ --out s3://bucket/results/ --storage-endpoint http://minio:9000
  ferry batch model.onnx s3://bucket/photos/ --out s3://bucket/results/ --address auto --resume   # after a crash

On a cluster every node needs ferry installed (pip install 'ferry[scale,cpu]') and the store's
credentials in its environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the provider's own);
inputs and --out must be URIs every node can reach (a local folder only if every node mounts it).
Needs Ray: pip install 'ferry[scale]'."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="an .onnx file written by `ferry export`")
    parser.add_argument("input", metavar="INPUT",
                        help="a folder, a glob, a text file listing paths/URIs (one per line), or a URI: a prefix "
                             "(s3://bucket/photos/) or a list file (s3://bucket/paths.txt)")
    parser.add_argument("--out", required=True,
                        help="where the results go: a local folder or a URI prefix (s3://bucket/out/, gs://..., abfs://..., "
                             "hdfs://...); new or empty, or this job's own unfinished output with --resume")
    parser.add_argument("--resume", action="store_true",
                        help="finish an earlier run of the same job (same model, inputs and --top-k) on the same --out: "
                             "its complete part files are kept, the rest are done")
    parser.add_argument("--storage-endpoint", metavar="URL",
                        help="an S3-compatible store for s3:// URIs, e.g. http://127.0.0.1:9000 "
                             "(default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else Amazon S3)")
    parser.add_argument("--address", help="join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray)")
    parser.add_argument("--workers", type=int, default=0, help="actors in the pool (default, or 0: one per CPU, or per GPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="CPUs each actor reserves; its onnxruntime threads follow (default: share what reading leaves)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each actor reserves (selects CUDA)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default: 32)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates kept per image (default: 5)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="detectors: keep detections scoring at least this, 0 to 1 (default: 0.5)")
    parser.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--object-store-mb", type=int, default=256, help="local Ray's object store in MiB (default: 256)")


def run(args: argparse.Namespace) -> int:
    from ferry.batch.job import BatchOptions, run_batch
    from ferry.runtime.images import quiet_bomb_warnings

    quiet_bomb_warnings()
    summary = run_batch(BatchOptions(
        model=args.model, input=args.input, out=args.out, address=args.address, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size,
        top_k=args.top_k, provider=args.provider, object_store_mb=args.object_store_mb, resume=args.resume,
        storage_endpoint=args.storage_endpoint, min_score=args.min_score,
    ))
    print(summary.describe())
    return 1 if summary.failures else 0
