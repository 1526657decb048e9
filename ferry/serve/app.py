"""The HTTP API: one Starlette app, the same on both hosts (one uvicorn process, or Ray Serve
replicas), over a `Backend` that does the inference.

  GET  /healthz                        liveness
  GET  /readyz                         readiness: every model loaded and answering
  GET  /v1/models                      the models and their metadata (labels, preprocessing, precision)
  GET  /v1/stats                       requests, batches and mean batch size per model
  POST /v1/models/<name>/predict       an image as the raw body or a multipart field; ?top_k=K

A prediction is {"model", "index", "label", "probability", "top_k": [...], "provider", "latency_ms"};
a detector's is {"model", "detections": [...], "width", "height", "min_score", "provider", "latency_ms"}
(?min_score=S; ferry/serve/detect.py).
Bad input is a 4xx with {"error": "<one line>"}, logged as one line, never a traceback; the server
keeps serving. With an API key every request needs `Authorization: Bearer KEY` (or `X-API-Key`).
No endpoint reads or writes server files.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from typing import Any

import numpy as np

from ferry.core.errors import FerryError

LOG = logging.getLogger("ferry.serve")
DEFAULT_MAX_BODY_MB = 16.0
MAX_TOP_K = 100


def _describe(clf) -> dict[str, Any]:
    m = clf.metadata
    return {"model": m.model, "task": m.task, "precision": m.precision, "labels": list(m.labels),
            "preprocess": m.preprocess.to_dict(), "input": m.input.to_dict(), "output": m.output.to_dict(),
            "weights": m.weights, "untrained": m.untrained, "format_version": m.format_version,
            "provider": clf.provider.used, **({"detection": m.detection.to_dict()} if m.detection else {})}


def create_app(backend, *, api_key: str | None = None, max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
               on_shutdown=None):
    """The ASGI app over `backend` (a LocalBackend, or the Ray Serve deployment itself)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ferry.runtime.images import ImageError, quiet_bomb_warnings

    quiet_bomb_warnings()
    models = backend.models
    expected = api_key.encode() if api_key else None

    def error(status: int, message: str) -> JSONResponse:
        line = message.splitlines()[0] if message else "error"
        LOG.warning("%d %s", status, line)
        return JSONResponse({"error": line}, status_code=status)

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), expected)

    def guarded(handler):
        async def endpoint(request: Request):
            if not authorized(request):
                return error(401, "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key)")
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - a request never takes the server down or prints a traceback
                LOG.error("500 %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)
        return endpoint

    async def healthz(_request: Request):
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request):
        return JSONResponse({"status": "ready", "models": sorted(models)})

    async def list_models(_request: Request):
        return JSONResponse({"models": [{"name": name, **_describe(clf)} for name, clf in models.items()]})

    async def stats(_request: Request):
        return JSONResponse({"models": backend.stats()})

    async def read_image(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return error(413, f"body of {int(declared):,} bytes is over the limit of {max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return error(413, f"body is over the limit of {max_body_bytes:,} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await _multipart_image(bytes(body), ctype, error)
        return bytes(body)

    async def predict(request: Request):
        t0 = time.perf_counter()
        name = request.path_params["name"]
        clf = models.get(name)
        if clf is None:
            return error(404, f"unknown model {name!r}; this server has {', '.join(sorted(models))}")
        if getattr(clf, "task", "classify") == "detect":  # detectors: ferry/serve/detect.py
            from ferry.serve.detect import predict_detections

            return await predict_detections(request, name, clf, backend, read_image, error, t0)
        raw_k = request.query_params.get("top_k", "1")
        if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_TOP_K:
            return error(400, f"top_k must be an integer from 1 to {MAX_TOP_K} (got {raw_k!r})")
        data = await read_image(request)
        if isinstance(data, JSONResponse):
            return data
        if not data:
            return error(400, "empty body: send an image (raw bytes, or a multipart file field)")
        try:
            x = await run_in_threadpool(clf.prepare, data, "image")
        except ImageError as exc:
            message = str(exc)
            return error(413 if "too large" in message else 400, message)
        except FerryError as exc:
            return error(400, str(exc))
        logits = await backend.infer(name, x)
        pred = clf.predictions(np.asarray(logits)[None], int(raw_k))[0]
        return JSONResponse({"model": name, **pred.to_dict(), "latency_ms": round(1e3 * (time.perf_counter() - t0), 3)})

    routes = [
        Route("/healthz", guarded(healthz)),
        Route("/readyz", guarded(readyz)),
        Route("/v1/models", guarded(list_models)),
        Route("/v1/stats", guarded(stats)),
        Route("/v1/models/{name}/predict", guarded(predict), methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if on_shutdown is not None:  # after uvicorn has finished the requests in flight
            await on_shutdown()

    return Starlette(routes=routes, lifespan=lifespan)


async def _multipart_image(body: bytes, content_type: str, error):
    """The first file field of a multipart/form-data body (or a field named image/file)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream(), max_part_size=len(body) + 1).parse()
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        return error(400, f"malformed multipart body ({type(exc).__name__})")
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        return error(400, "multipart body has no file field: send the image as a file field (e.g. -F image=@cat.jpg)")
    preferred = next((form[k] for k in ("image", "file") if isinstance(form.get(k), UploadFile)), files[0])
    return await preferred.read()
