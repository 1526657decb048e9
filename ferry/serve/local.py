"""The one-machine host: the app in one uvicorn process (or N worker processes), in-process batching."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
from dataclasses import asdict, dataclass

from ferry.core.errors import FerryError

CONFIG_ENV = "FERRY_SERVE_CONFIG"  # how `--workers N` hands the configuration to uvicorn's worker processes
API_KEY_ENV = "FERRY_API_KEY"


@dataclass
class ServeOptions:
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    threads: int = 0  # onnxruntime intra-op threads per process (0: physical cores / workers)
    max_batch_size: int = 8
    batch_wait_ms: float | None = None  # None: 2 ms on a GPU, 0 on a CPU
    workers: int = 1
    api_key: str | None = None
    max_body_mb: float = 16.0
    address: str | None = None  # Ray Serve: a cluster address (or "local" for a local Ray)
    replicas: int = 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: ServeOptions) -> None:
    """Safe by default: binding anything but loopback needs an API key."""
    if not opts.api_key:
        opts.api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(opts.host) and not opts.api_key:
        raise FerryError(f"--host {opts.host} would accept requests from other machines: give an API key "
                         f"(--api-key KEY or ${API_KEY_ENV}), or bind 127.0.0.1")
    problems = []
    if not 0 <= opts.port <= 65535:
        problems.append(f"--port must be 0-65535 (got {opts.port})")
    if opts.workers < 1:
        problems.append(f"--workers must be >= 1 (got {opts.workers})")
    if opts.replicas < 1:
        problems.append(f"--replicas must be >= 1 (got {opts.replicas})")
    if opts.max_batch_size < 1:
        problems.append(f"--max-batch-size must be >= 1 (got {opts.max_batch_size})")
    if opts.batch_wait_ms is not None and opts.batch_wait_ms < 0:
        problems.append(f"--batch-wait-ms must be >= 0 (got {opts.batch_wait_ms})")
    if opts.max_body_mb <= 0:
        problems.append(f"--max-body-mb must be > 0 (got {opts.max_body_mb})")
    if opts.threads < 0:
        problems.append(f"--threads must be >= 0 (got {opts.threads})")
    if problems:
        raise FerryError("; ".join(problems))
    if opts.address is None:
        _check_port_free(opts.host, opts.port)


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FerryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def threads_per_process(opts: ServeOptions) -> int:
    from ferry.runtime.providers import default_threads

    return opts.threads or max(1, default_threads() // opts.workers)


def build_app(opts: ServeOptions):
    """Models, batching backend and app, for one process."""
    from ferry.serve.app import create_app
    from ferry.serve.backend import LocalBackend, load_models

    models = load_models(opts.models, provider=opts.provider, threads=threads_per_process(opts))
    backend = LocalBackend(models, max_batch_size=opts.max_batch_size, batch_wait_ms=opts.batch_wait_ms)
    app = create_app(backend, api_key=opts.api_key, max_body_bytes=int(opts.max_body_mb * 2**20), on_shutdown=backend.close)
    app.state.backend = backend
    return app


def app_from_env():
    """uvicorn's factory in each worker process of `--workers N`."""
    return build_app(ServeOptions(**json.loads(os.environ[CONFIG_ENV])))


def describe(opts: ServeOptions, app) -> str:
    backend = app.state.backend
    models = ", ".join(f"{n} ({c.provider.describe()})" for n, c in backend.models.items())
    return (f"ferry serve: http://{opts.host}:{opts.port}  models: {models}; batching: up to {backend.max_batch_size}, "
            f"wait {backend.batch_wait_ms:g} ms; {opts.workers} process(es)"
            + ("; API key required" if opts.api_key else ""))


def serve_local(opts: ServeOptions, *, log=print) -> int:
    import logging

    import uvicorn

    check_options(opts)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    common = dict(host=opts.host, port=opts.port, log_level="warning", access_log=False, timeout_graceful_shutdown=30)
    if opts.workers == 1:
        app = build_app(opts)  # a bad model fails here, before the port is opened
        log(describe(opts, app))
        # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then re-raises the signal to the
        # handler that was there before it: make that a no-op, so a requested stop exits 0.
        stopped: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stopped.append(signum))
        uvicorn.run(app, **common)
        if stopped:
            log(f"ferry serve: stopped by {signal.Signals(stopped[0]).name} after the requests in flight")
        return 0
    build_app(ServeOptions(**{**asdict(opts), "workers": opts.workers}))  # check the models once, in this process
    os.environ[CONFIG_ENV] = json.dumps(asdict(opts))
    log(f"ferry serve: http://{opts.host}:{opts.port}  {opts.workers} worker processes, {threads_per_process(opts)} "
        f"onnxruntime thread(s) each")
    uvicorn.run("ferry.serve.local:app_from_env", factory=True, workers=opts.workers, **common)
    return 0
