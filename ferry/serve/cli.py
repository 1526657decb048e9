"""Serve exported models over HTTP: one uvicorn process by default (fast on one machine), or Ray
Serve replicas across a cluster with --address. Binds 127.0.0.1 unless told otherwise; any other
address needs an API key. SIGTERM or Ctrl-C stops it after the requests in flight.

  ferry serve models/mnist-cnn.onnx models/resnet50.int8.onnx --port 8000
  curl -s --data-binary @samples/digits/digit_7.png localhost:8000/v1/models/mnist-cnn/predict?top_k=3
  ferry serve models/resnet50.fp16.onnx --address auto --replicas 4 --host 0.0.0.0 --api-key $KEY

API: GET /healthz, /readyz, /v1/models, /v1/stats; POST /v1/models/<name>/predict (raw body or
multipart file; ?top_k=K). Needs `pip install 'ferry[serve]'` (and 'ferry[scale]' for --address)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files written by `ferry export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; others need --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="largest batch formed from concurrent requests (default: 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="how long a batch waits to fill (default: 2 on a GPU, 0 on a CPU: never delays a lone request)")
    parser.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default: auto)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per process (default: cores / workers)")
    parser.add_argument("--api-key", help="require this key on every request (also $FERRY_API_KEY)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default: 16)")
    parser.add_argument("--address", help="deploy on Ray Serve: auto, HOST:PORT, ray://HOST:PORT, or local (start a local Ray)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --address; default: 1)")


def run(args: argparse.Namespace) -> int:
    from ferry.serve.local import ServeOptions

    opts = ServeOptions(models=args.models, host=args.host, port=args.port, provider=args.provider, threads=args.threads,
                        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, workers=args.workers,
                        api_key=args.api_key, max_body_mb=args.max_body_mb, address=args.address, replicas=args.replicas)
    if args.address:
        from ferry.serve.ray_host import serve_on_ray

        return serve_on_ray(opts)
    from ferry.serve.local import serve_local

    return serve_local(opts)
