"""The HTTP API: one ASGI app, the same on both hosts (one uvicorn process or N worker processes,
or Ray Serve replicas), over a `Backend` that does the inference (backend.py).

  GET  /healthz                        liveness (no API key)
  GET  /readyz                         readiness: every model loaded and warmed; 503 while draining (no API key)
  GET  /metrics                        Prometheus metrics (metrics.py)
  GET  /openapi.json, /docs            the OpenAPI 3 description and its page (openapi.py)
  GET  /v1/models                      the models and their metadata (labels, preprocessing, precision)
  GET  /v1/stats                       requests, batches and mean batch size per model
  POST /v1/models/<name>/predict       one image, the raw body or one multipart file field; ?top_k=K
                                       (a detector: ?min_score=S; detect.py); any other query: 400
  POST /v1/admin/reload                load the model files again (as SIGHUP does)

A prediction is {"model", "index", "label", "probability", "top_k": [...], "provider", "latency_ms",
"request_id"}; a detector's is {"model", "detections": [...], "width", "height", "min_score", "provider",
"latency_ms", "request_id"}. An error is {"error": "<one line>", "request_id"}; 4xx are logged as one line, 5xx
with their traceback, both with the request id, which every answer carries (`X-Request-ID`,
echoed when the client sends a valid one).

Admission control: at most `max_queue` prediction requests per model are admitted at once (reading,
decoding, queued or computing); one more gets 503 with Retry-After at once, before its body is
read. An admitted request not answered within `timeout_s` of its arrival gets 504 and its work is
dropped; its place is given back once a decode it started (a thread, which cannot be stopped) has
finished (`_Place`). A body whose Content-Length is over the limit gets 413 before any of it is read; the rest
of any body the handler did not read is read and thrown away (bounded in time) before the answer,
so a client still sending gets the answer rather than a reset connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.serve.detect import parse_min_score

LOG = logging.getLogger("ferry.serve")
DEFAULT_MAX_BODY_MB = 16.0
MAX_TOP_K = 100
RETRY_AFTER_S = 1
DRAIN_BODY_S = 5.0  # how long an unread request body is read and discarded before an early answer
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PREDICT_PATH = "/v1/models/{name}/predict"
STATIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/v1/models", "/v1/stats",
                          "/v1/admin/reload"})
_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_TOP_K = re.compile(r"[0-9]{1,6}")
QUERY_PARAMETERS = ("top_k", "min_score")  # what a prediction takes: top_k (classifiers), min_score (detectors)


@dataclass
class AppConfig:
    """What the app enforces, per process (or per Ray Serve replica)."""

    api_key: str | None = None  # required on every endpoint but the probes when set
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)  # larger bodies get 413 before they are read
    max_queue: int = 16  # prediction requests admitted at once per model; one more gets 503
    timeout_s: float = 10.0  # an admitted prediction not answered within this many seconds gets 504
    request_id_header: bool = True  # False behind Ray Serve, whose proxy returns X-Request-ID itself
    drain_timeout_s: float = 15.0  # while draining, a 503's Retry-After: by then this server has exited


class ServerState:
    """What the host and the app share: readiness, draining, the admitted prediction requests."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.pending: dict[str, int] = {}  # model -> admitted prediction requests
        self.reloading = 0
        self.reload: Callable[[], Awaitable[Any]] | None = None  # the host's reload (all processes / replicas)

    @property
    def busy(self) -> int:
        """Admitted requests not yet answered: what a drain waits for."""
        return sum(self.pending.values()) + self.reloading


class _Throttle:
    """A log line for a repeated event (503, 504) at most every `every` seconds, with the count."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def note(self, key: str, message: str, request_id: str) -> None:
        n = self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.every:
            LOG.warning("%s: %d request(s) since the last such line (last request %s)", message, n, request_id)
            self.counts[key], self.last[key] = 0, now


def request_id_of(value: bytes | None) -> str:
    """The client's X-Request-ID when it is a safe token (it goes into log lines), else a new one."""
    if value is not None and _VALID_ID.fullmatch(value):
        return value.decode()
    return os.urandom(8).hex()


def parse_top_k(values: list[str]) -> int:
    """The `top_k` query parameter, typed: ASCII digits 1..MAX_TOP_K, given at most once."""
    if not values:
        return 1
    raw = values[-1]
    if len(values) > 1 or not _TOP_K.fullmatch(raw) or not 1 <= int(raw) <= MAX_TOP_K:
        shown = raw if len(raw) <= 20 else raw[:20] + "..."
        raise FerryError(f"query parameter top_k must be an integer from 1 to {MAX_TOP_K}, given once "
                         f"(got {shown!r}{f' and {len(values) - 1} more' if len(values) > 1 else ''})")
    return int(raw)


def check_query_names(names) -> None:
    """A FerryError naming the query parameters of a prediction that are none of QUERY_PARAMETERS."""
    unknown = sorted({n for n in names if n not in QUERY_PARAMETERS})
    if unknown:
        shown = ", ".join(repr(n if len(n) <= 20 else n[:20] + "...") for n in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise FerryError(f"unknown query parameter{'s' if len(unknown) > 1 else ''} {shown}{more}: a prediction takes "
                         "top_k (classifiers) or min_score (detectors)")


def query_for_other_task(model: str, task: str, names) -> str | None:
    """What is wrong when a query parameter is for the other kind of model (top_k on a detector,
    min_score on a classifier), as `ferry predict` refuses --top-k and --min-score; else None."""
    present = set(names)
    if task == "detect" and "top_k" in present:
        return f"query parameter top_k is for classifiers; {model} is a detector (use min_score)"
    if task != "detect" and "min_score" in present:
        return f"query parameter min_score is for detectors; {model} is a classifier (use top_k)"
    return None


def _describe(name: str, clf, load_seconds: float | None) -> dict[str, Any]:
    m = clf.metadata
    d = {"name": name, "model": m.model, "task": m.task, "precision": m.precision, "labels": list(m.labels),
         "preprocess": m.preprocess.to_dict(), "input": m.input.to_dict(), "output": m.output.to_dict(),
         "weights": m.weights, "untrained": m.untrained, "format_version": m.format_version,
         "provider": clf.provider.used, "threads": clf.provider.threads}
    if m.detection is not None:
        d["detection"] = m.detection.to_dict()
    if load_seconds is not None:
        d["load_seconds"] = round(load_seconds, 4)
    return d


def _path_template(path: str) -> str:
    if path in STATIC_PATHS:
        return path
    if path.startswith("/v1/models/") and path.endswith("/predict"):
        return PREDICT_PATH
    return "other"


def _predict_model(path: str) -> str | None:
    """The {name} of a prediction path, or None for any other path."""
    if path.startswith("/v1/models/") and path.endswith("/predict"):
        return path[len("/v1/models/"):-len("/predict")]
    return None


class _Place:
    """One admitted prediction's place among its model's `max_queue`, given back (`release`) once
    nothing holds it: the request (until it is answered, 504 included) and each piece of its work
    handed to a thread (`in_thread`), which a 504 cannot stop. So a flood of slow decodes past their
    deadline never runs more decodes at once than the model admits requests."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._holders = 1  # the request

    def drop(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release()

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the loop's default executor, this place held until fn has returned; if the
        awaiting request is cancelled (its deadline) before fn started, fn never runs."""
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        state = {"started": False, "abandoned": False}
        self._holders += 1

        def work() -> Any:
            with lock:
                if state["abandoned"]:
                    return None
                state["started"] = True
            try:
                return fn(*args)
            finally:
                try:
                    loop.call_soon_threadsafe(self.drop)
                except RuntimeError:  # the loop is closed: the server is gone, and its places with it
                    pass

        try:
            return await loop.run_in_executor(None, work)
        except BaseException:
            with lock:
                never_ran = not state["started"]
                state["abandoned"] = True
            if never_ran:
                self.drop()
            raise


if sys.version_info >= (3, 11):
    async def _within(deadline: float, coro):
        async with asyncio.timeout_at(deadline):
            return await coro
else:  # pragma: no cover - Python 3.10
    async def _within(deadline: float, coro):
        return await asyncio.wait_for(coro, max(0.0, deadline - asyncio.get_running_loop().time()))


class FerryApp:
    """The ASGI app: request ids, the API key, draining, metrics and error handling around the
    Starlette routes (`self.routes`); the hosts read `state`, `backend`, `metrics`."""

    def __init__(self, routes_app, backend, config: AppConfig, state: ServerState, metrics) -> None:
        self.routes, self.backend, self.config, self.state, self.metrics = routes_app, backend, config, state, metrics
        self._key = config.api_key.encode() if config.api_key else None
        self._drain_retry = str(max(1, math.ceil(config.drain_timeout_s))).encode()
        self.throttle = _Throttle()

    def _authorized(self, key: bytes | None, auth: bytes | None) -> bool:
        if key is not None and hmac.compare_digest(key, self._key):
            return True
        if auth is not None and auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self._key):
            return True
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.routes(scope, receive, send)
            return
        t0 = time.monotonic()
        rid = auth = key = None
        has_body = expect = False
        for hname, value in scope["headers"]:
            if hname == b"x-request-id":
                rid = value
            elif hname == b"authorization":
                auth = value
            elif hname == b"x-api-key":
                key = value
            elif hname == b"content-length":
                has_body = value.strip() not in (b"0", b"")
            elif hname == b"transfer-encoding":
                has_body = True
            elif hname == b"expect":
                expect = value.lower() == b"100-continue"
        request_id = request_id_of(rid)
        scope["ferry.request_id"] = request_id
        scope["ferry.t0"] = t0
        path = scope["path"]
        state = self.state
        body_done = not has_body
        received = False
        status = 500
        started = False
        extra: list[tuple[bytes, bytes]] = []
        if self.config.request_id_header:
            extra.append((b"x-request-id", request_id.encode()))

        async def rx():
            nonlocal body_done, received
            received = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def drain_body() -> None:
            nonlocal body_done
            loop = asyncio.get_running_loop()
            end = loop.time() + DRAIN_BODY_S
            while not body_done and (left := end - loop.time()) > 0:
                try:
                    await asyncio.wait_for(rx(), left)
                except asyncio.TimeoutError:
                    break

        async def tx(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not body_done and not (expect and not received):
                    # the client is still sending: read the rest away first, or closing the connection
                    # with unread data would reset it and the client would never see this answer
                    await drain_body()
                    if not body_done:
                        headers.append((b"connection", b"close"))
                if state.draining:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers + extra}
            await send(message)

        model = _predict_model(path)
        try:
            if self._key is not None and path not in OPEN_PATHS and not self._authorized(key, auth):
                self.throttle.note("401", "401 missing or wrong API key", request_id)  # a flood stays a few lines
                await self._send_error(tx, request_id, 401, "missing or wrong API key (send Authorization: Bearer KEY "
                                       "or X-API-Key: KEY)", [(b"www-authenticate", b"Bearer")], log=False)
            elif state.draining and (model is not None or path == "/v1/admin/reload"):
                await self._send_error(tx, request_id, 503, "the server is stopping: retry on another instance",
                                       [(b"retry-after", self._drain_retry)], log=False)
            else:
                await self.routes(scope, rx, tx)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback and the request id; the server goes on
            LOG.error("500 request %s: %s %s failed", request_id, scope.get("method"), path, exc_info=exc)
            status = 500
            if not started:
                await self._send_error(tx, request_id, 500, f"internal error ({type(exc).__name__}); "
                                       f"the server log has the details under request id {request_id}", log=False)
        if self.metrics is not None:
            if model is not None and self.backend.models.get(model) is None:
                model = "-"
            self.metrics.request_done(_path_template(path), model, status, time.monotonic() - t0)

    async def _send_error(self, tx, request_id: str, status: int, message: str, headers=(), log: bool = True) -> None:
        import json

        if log:
            LOG.warning("%d %s (request %s)", status, message, request_id)
        body = json.dumps({"error": message, "request_id": request_id}).encode()
        await tx({"type": "http.response.start", "status": status,
                  "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                              *headers]})
        await tx({"type": "http.response.body", "body": body})


def create_app(backend, config: AppConfig | None = None, *, state: ServerState | None = None, metrics=None,
               on_startup: Callable[[FerryApp], Awaitable[None]] | None = None,
               on_shutdown: Callable[[], Awaitable[None]] | None = None) -> FerryApp:
    """The ASGI app over `backend` (a LocalBackend, or the Ray Serve deployment itself)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from ferry import __version__
    from ferry.runtime.classifier import ModelOutputError
    from ferry.runtime.images import ImageTooLarge, quiet_bomb_warnings
    from ferry.serve.metrics import CONTENT_TYPE
    from ferry.serve.openapi import docs_html, openapi_spec

    quiet_bomb_warnings()
    config = config or AppConfig()
    state = state or ServerState()
    if state.reload is None:
        state.reload = backend.reload
    pending = state.pending
    max_body, max_queue, timeout_s = config.max_body_bytes, config.max_queue, config.timeout_s
    retry_after = {"Retry-After": str(RETRY_AFTER_S)}
    in_flight: dict[str, Any] = {}

    def error(request: Request, status: int, message: str, headers: dict | None = None, log: bool = True) -> JSONResponse:
        line = message.splitlines()[0] if message else "error"
        rid = request.scope.get("ferry.request_id", "")
        if log:
            LOG.warning("%d %s (request %s)", status, line, rid)
        return JSONResponse({"error": line, "request_id": rid}, status_code=status, headers=headers)

    async def healthz(_request: Request):
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request):
        names = sorted(backend.models)
        if state.draining or not state.ready:
            return JSONResponse({"status": "draining" if state.draining else "starting", "models": names}, status_code=503,
                                headers={"Retry-After": self_app._drain_retry.decode()} if state.draining else retry_after)
        return JSONResponse({"status": "ready", "models": names})

    async def metrics_page(_request: Request):
        return Response(await backend.metrics_page(), media_type=CONTENT_TYPE)

    spec_cache: dict[tuple, dict] = {}

    def spec() -> dict:
        names = tuple(sorted(backend.models))
        detectors = tuple(n for n in names if backend.models[n].task == "detect")
        key = (names, detectors)  # a reload may change the models, or what they are
        if key not in spec_cache:
            spec_cache.clear()
            spec_cache[key] = openapi_spec(list(names), auth=config.api_key is not None, max_body_bytes=max_body,
                                           max_top_k=MAX_TOP_K, max_queue=max_queue, timeout_s=timeout_s,
                                           version=__version__, detectors=detectors)
        return spec_cache[key]

    async def openapi(_request: Request):
        return JSONResponse(spec())

    async def docs(_request: Request):
        return HTMLResponse(docs_html(spec()))

    async def list_models(_request: Request):
        seconds = getattr(backend, "load_seconds", {})
        return JSONResponse({"models": [_describe(name, clf, seconds.get(name)) for name, clf in backend.models.items()]})

    async def stats(_request: Request):
        return JSONResponse({"models": await backend.stats()})

    async def reload(request: Request):
        state.reloading += 1
        try:
            result = await state.reload()
        finally:
            state.reloading -= 1
        if not result.ok:
            LOG.warning("409 %s (request %s)", result.error, request.scope.get("ferry.request_id", ""))
            return error(request, 409, result.error, log=False)
        LOG.info("reloaded %s (request %s)", ", ".join(m["name"] for m in result.models), request.scope["ferry.request_id"])
        return JSONResponse(result.to_dict())

    async def predict(request: Request):
        scope = request.scope
        name = request.path_params["name"]
        query = request.query_params
        try:
            check_query_names(query.keys())
            top_k = parse_top_k(query.getlist("top_k"))
            min_score = parse_min_score(query.getlist("min_score"))
        except FerryError as exc:
            return error(request, 400, str(exc))
        entry = backend.entry(name)
        if entry is None:
            return error(request, 404, f"unknown model {name[:100]!r}; this server has {', '.join(sorted(backend.models))}")
        try:
            misplaced = query_for_other_task(entry.name, entry.clf.task, query.keys())
            if misplaced:
                return error(request, 400, misplaced)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_body:
                return error(request, 413, f"body of {int(declared):,} bytes is over the limit of {max_body:,} "
                                           "(--max-body-mb)")
            admitted = pending.get(name, 0)
            if admitted >= max_queue:
                self_app.throttle.note(f"503 {name}", f"503 model {name} is at its limit of {max_queue} admitted requests "
                                       "(--max-queue)", scope["ferry.request_id"])
                return error(request, 503, f"model {name} is busy: {max_queue} requests are already admitted "
                             f"(--max-queue); retry after {RETRY_AFTER_S} s", retry_after, log=False)
            pending[name] = admitted + 1

            def give_back() -> None:
                pending[name] -= 1

            place = _Place(give_back)
            gauge = in_flight.get(name)
            if gauge is None and metrics is not None:
                gauge = in_flight[name] = metrics.gauge("in_flight", name)
            if gauge is not None:
                gauge.inc()
            try:
                deadline = asyncio.get_running_loop().time() + timeout_s - (time.monotonic() - scope["ferry.t0"])
                return await _within(deadline, answer(request, entry, top_k, min_score, place))
            except (TimeoutError, asyncio.TimeoutError):
                self_app.throttle.note(f"504 {name}", f"504 model {name}: not answered within {timeout_s:g} s (--timeout-s)",
                                       scope["ferry.request_id"])
                return error(request, 504, f"not answered within {timeout_s:g} s (--timeout-s); the request's work was "
                             "dropped", log=False)
            finally:
                place.drop()  # the place itself is free once a decode still running past a 504 has finished
                if gauge is not None:
                    gauge.dec()
        finally:
            entry.release()

    async def answer(request: Request, entry, top_k: int, min_score: float | None, place: _Place):
        data = await read_body(request)
        if isinstance(data, Response):
            return data
        if not data:
            return error(request, 400, "empty body: send an image (raw bytes, or a multipart file field)")
        detector = entry.clf.task == "detect"
        try:
            prepare = entry.clf.prepare_frame if detector else entry.clf.prepare
            x = await place.in_thread(prepare, data, "image")
        except ImageTooLarge as exc:
            return error(request, 413, str(exc))
        except FerryError as exc:  # ImageError included
            return error(request, 400, str(exc))
        if detector:  # a detector's answer: detect.py
            x, frame = x
            row = await entry.submit(x)
            found = entry.clf.detections(np.asarray(row), frame, min_score).to_dict()
        else:
            logits = await entry.submit(x)
            try:
                found = entry.clf.predictions(np.asarray(logits)[None], top_k)[0].to_dict()
            except ModelOutputError as exc:  # the model's fault, not the request's: said, not a traceback
                return error(request, 500, str(exc))
        scope = request.scope
        return JSONResponse({"model": entry.name, **found,
                             "latency_ms": round(1e3 * (time.monotonic() - scope["ferry.t0"]), 3),
                             "request_id": scope["ferry.request_id"]})

    async def read_body(request: Request) -> bytes | Response:
        chunks = []
        size = 0
        while True:
            message = await request.receive()
            if message["type"] != "http.request":
                break  # the client went away
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > max_body:
                    return error(request, 413, f"body is over the limit of {max_body:,} bytes (--max-body-mb)")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            got = await _multipart_image(body, ctype)
            return got if isinstance(got, bytes) else error(request, 400, got)
        return body

    async def not_found(request: Request, _exc):
        return error(request, 404, f"no endpoint {request.url.path[:100]}; see /docs")

    async def not_allowed(request: Request, exc: HTTPException):
        return error(request, 405, f"method {request.method} is not allowed on {request.url.path[:100]}", exc.headers)

    async def internal(request: Request, exc: Exception):
        # the response of Starlette's error middleware; FerryApp logs the traceback
        rid = request.scope.get("ferry.request_id", "")
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details under "
                                      f"request id {rid}", "request_id": rid}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if on_startup is not None:
            await on_startup(self_app)
        state.ready = True
        yield
        state.ready = False
        if on_shutdown is not None:  # after the host has finished the requests in flight
            await on_shutdown()

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_page),
        Route("/openapi.json", openapi),
        Route("/docs", docs),
        Route("/v1/models", list_models),
        Route("/v1/stats", stats),
        Route(PREDICT_PATH, predict, methods=["POST"]),
        Route("/v1/admin/reload", reload, methods=["POST"]),
    ]
    starlette = Starlette(routes=routes, lifespan=lifespan,
                          exception_handlers={404: not_found, 405: not_allowed, Exception: internal})
    self_app = FerryApp(starlette, backend, config, state, metrics)
    return self_app


async def _multipart_image(body: bytes, content_type: str) -> bytes | str:
    """The one file field of a multipart/form-data body, or what is wrong (none, or more than one:
    a prediction answers for one image, never silently for one of several)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream(), max_part_size=len(body) + 1).parse()
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        return f"malformed multipart body ({type(exc).__name__})"
    try:
        # every file field, repeated names included; a form's unselected file input (no name, nothing in it) is no file
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile) and (v.filename or v.size)]
        if not files:
            return "multipart body has no file field: send the image as a file field (e.g. -F image=@cat.jpg)"
        if len(files) > 1:
            return f"multipart body has {len(files)} file fields: send one image per request (e.g. -F image=@cat.jpg)"
        return await files[0].read()
    finally:
        await form.close()
