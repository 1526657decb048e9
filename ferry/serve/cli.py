"""Serve exported models over HTTP: one uvicorn process by default (fast on one machine), or Ray
Serve replicas across a cluster with --address. Binds 127.0.0.1 unless told otherwise; any other
address needs an API key, read from $FERRY_API_KEY or --api-key-file (never from the command line,
where the process list would show it).

  ferry serve models/mnist-cnn.onnx models/resnet50.int8.onnx --port 8000
  curl -s --data-binary @ferry/samples/digits/digit_7.png localhost:8000/v1/models/mnist-cnn/predict?top_k=3
  FERRY_API_KEY=... ferry serve models/resnet50.fp16.onnx --address auto --replicas 4 --host 0.0.0.0

API (the OpenAPI 3 description at /openapi.json, its page at /docs): GET /healthz, /readyz (both
without the key), /metrics (Prometheus), /v1/models, /v1/stats; POST /v1/models/<name>/predict (one
image: raw body or one multipart file; ?top_k=K, a detector ?min_score=S), /v1/admin/reload.

Overload: at most --max-queue predictions per model are admitted at once; more get 503 with
Retry-After at once; an admitted one not answered within --timeout-s gets 504 (its place is free
again once an image decode it started has finished). SIGTERM or Ctrl-C: /readyz turns 503, new
predictions get 503, the admitted ones finish, and the server exits within --drain-timeout-s.
SIGHUP (or POST /v1/admin/reload) reloads the model files without a restart; if a new file is bad,
the previous models keep serving.

Needs `pip install 'ferry[serve]'` (and 'ferry[scale]' for --address)."""

from __future__ import annotations

import argparse

from ferry.core.errors import FerryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files written by `ferry export`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1; any other needs an API key)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port (default: 8000; 0: one the system picks, printed when the server starts)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="largest batch formed from concurrent requests, 1-4096 (default: 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="how long a batch waits to fill, under --timeout-s (default: 2 on a GPU, 0 on a CPU: never "
                             "delays a lone request)")
    parser.add_argument("--max-queue", type=int, default=0,
                        help="prediction requests per model the server admits at once (reading, decoding, queued or "
                             "computing), split over the worker processes or replicas; one more gets 503 with Retry-After "
                             "(default, or 0: 2 x --max-batch-size, at least 16, per process or replica)")
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="deadline of a prediction from its arrival; past it: 504 and its work is dropped (default: 10)")
    parser.add_argument("--drain-timeout-s", type=float, default=15.0,
                        help="on SIGTERM or Ctrl-C, the longest the server takes to finish the admitted requests and "
                             "exit (default: 15)")
    parser.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads per process or replica (default: cores / workers; with --address: 1)")
    parser.add_argument("--api-key-file", metavar="FILE",
                        help="require the key on the first line of FILE on every endpoint but /healthz and /readyz "
                             "(default: $FERRY_API_KEY when set)")
    parser.add_argument("--api-key", nargs="?", const="", default=None, help=argparse.SUPPRESS)  # refused in run()
    parser.add_argument("--max-body-mb", type=float, default=16.0,
                        help="largest request body in MiB; larger ones get 413 before they are read (default: 16)")
    parser.add_argument("--address", help="deploy on Ray Serve: auto, HOST:PORT, ray://HOST:PORT, or local (start a local Ray)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --address; default: 1)")
    parser.add_argument("--replace", action="store_true",
                        help="with --address: replace ferry's app already running on the cluster's Ray Serve (the "
                             "`ferry serve` that deployed it exits); without it, a running app is an error")


def run(args: argparse.Namespace) -> int:
    from ferry.serve.local import ServeOptions

    if args.api_key is not None:  # never echo the value: it would land in logs
        raise FerryError("--api-key is not accepted (the process list would show the key): set $FERRY_API_KEY "
                         "or put the key in a file and give --api-key-file FILE")
    opts = ServeOptions(models=args.models, host=args.host, port=args.port, provider=args.provider, threads=args.threads,
                        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, workers=args.workers,
                        api_key_file=args.api_key_file, max_body_mb=args.max_body_mb, max_queue=args.max_queue,
                        timeout_s=args.timeout_s, drain_timeout_s=args.drain_timeout_s, address=args.address,
                        replicas=args.replicas, replace=args.replace)
    if args.address:
        from ferry.serve.ray_host import serve_on_ray

        return serve_on_ray(opts)
    from ferry.serve.local import serve_local

    return serve_local(opts)
