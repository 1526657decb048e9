"""The one-machine host: the app in one uvicorn process (or N worker processes), in-process batching.

Stopping: SIGTERM or Ctrl-C starts a drain: /readyz answers 503, new predictions get 503 (with
`Connection: close`), the admitted ones finish; then uvicorn stops, all within `--drain-timeout-s`.
SIGHUP reloads the model files in place (in every worker process), as POST /v1/admin/reload does.
With `--workers N` the metrics of every worker are summed through prometheus_client's multiprocess
mode, in a temporary folder this process creates and removes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass, field

from ferry.core.errors import FerryError

CONFIG_ENV = "FERRY_SERVE_CONFIG"  # how `--workers N` hands the configuration to uvicorn's worker processes
API_KEY_ENV = "FERRY_API_KEY"
SUPERVISED_ENV = "FERRY_SERVE_SUPERVISOR"  # set in worker processes: the pid of the parent that forwards SIGHUP


@dataclass
class ServeOptions:
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    threads: int = 0  # onnxruntime intra-op threads per process or replica (0: physical cores / workers; Ray: 1)
    max_batch_size: int = 8
    batch_wait_ms: float | None = None  # None: 2 ms on a GPU, 0 on a CPU
    workers: int = 1
    api_key: str | None = field(default=None, repr=False)  # from api_key_file or $FERRY_API_KEY, never a flag
    api_key_file: str | None = None  # a file holding the key (first line)
    max_body_mb: float = 16.0
    max_queue: int = 0  # prediction requests admitted at once per model, over the server (0: see queue_per_unit)
    timeout_s: float = 10.0  # deadline of a prediction request from its arrival (then 504, its work dropped)
    drain_timeout_s: float = 15.0  # SIGTERM: the longest the server takes to finish the requests in flight and exit
    address: str | None = None  # Ray Serve: a cluster address (or "local" for a local Ray)
    replicas: int = 1
    replace: bool = False  # Ray Serve: replace ferry's app already running on the cluster (else: refused)


def say(message: str) -> None:
    """A line about the server's life (started, draining, reloaded, stopped) on stdout, at once."""
    print(message, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(opts: ServeOptions) -> None:
    """The key from --api-key-file (its first line) or $FERRY_API_KEY; the key itself is never printed."""
    if opts.api_key_file:
        try:
            with open(opts.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise FerryError(f"--api-key-file {opts.api_key_file}: cannot read it ({exc.strerror or exc})") from exc
        except UnicodeDecodeError as exc:
            raise FerryError(f"--api-key-file {opts.api_key_file}: not a text file") from exc
        if not key:
            raise FerryError(f"--api-key-file {opts.api_key_file}: the first line is empty; write the key there")
        opts.api_key = key
    elif not opts.api_key:
        opts.api_key = os.environ.get(API_KEY_ENV) or None


def units(opts: ServeOptions) -> int:
    """Processes (or Ray Serve replicas) that share the server's queue."""
    return opts.replicas if opts.address else opts.workers


WORKER_HEALTHCHECK_S = 30  # --workers N: a worker that does not answer the supervisor's ping this long is restarted
DEFAULT_QUEUE = 16  # the least each process admits per model by default
# The largest --max-batch-size: every model is warmed at it before the server starts (a batch of zeros
# and the model's activations for it, in memory at once); the largest batch ferry bench measures.
MAX_BATCH_SIZE = 4096


def queue_per_unit(opts: ServeOptions) -> int:
    """Prediction requests each process (or replica) admits at once per model: --max-queue split
    over them; by default two full batches each, and at least DEFAULT_QUEUE."""
    if opts.max_queue:
        return max(1, math.ceil(opts.max_queue / units(opts)))
    return max(DEFAULT_QUEUE, 2 * opts.max_batch_size)


def _finite(value) -> bool:
    """A real number, not inf or NaN (argparse's float() takes "inf" and "nan")."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_options(opts: ServeOptions) -> None:
    """Safe by default: binding anything but loopback needs an API key. Every other problem of the
    options is collected and reported together, in one line."""
    resolve_api_key(opts)
    if not is_loopback(opts.host) and not opts.api_key:
        raise FerryError(f"--host {opts.host} would accept requests from other machines: give an API key "
                         f"(${API_KEY_ENV} or --api-key-file FILE), or bind 127.0.0.1")
    problems = []
    if not 0 <= opts.port <= 65535:
        problems.append(f"--port must be 0-65535 (got {opts.port})")
    elif opts.port == 0 and opts.address:
        problems.append("--port 0 is for the local server: on Ray Serve (--address) every node's proxy would pick a "
                        "port of its own, which ferry cannot show; give a port")
    if opts.workers < 1:
        problems.append(f"--workers must be >= 1 (got {opts.workers})")
    if opts.replicas < 1:
        problems.append(f"--replicas must be >= 1 (got {opts.replicas})")
    elif opts.replicas != 1 and not opts.address:
        problems.append(f"--replicas {opts.replicas} is for Ray Serve (with --address); on one machine --workers "
                        f"sets the processes")
    if opts.replace and not opts.address:
        problems.append("--replace is for Ray Serve (with --address): it replaces ferry's app running on the cluster")
    if opts.workers != 1 and opts.address:
        problems.append(f"--workers {opts.workers} is for the local server; on Ray Serve (--address) --replicas "
                        f"sets the copies")
    if not 1 <= opts.max_batch_size <= MAX_BATCH_SIZE:
        problems.append(f"--max-batch-size must be 1-{MAX_BATCH_SIZE} (got {opts.max_batch_size}): each model is warmed "
                        f"at this batch size before the server starts, a whole batch of inputs in memory")
    if not _finite(opts.timeout_s) or opts.timeout_s <= 0:
        problems.append(f"--timeout-s must be a finite number > 0 (got {opts.timeout_s:g})")
    wait = opts.batch_wait_ms
    if wait is not None:
        if not _finite(wait) or wait < 0:
            problems.append(f"--batch-wait-ms must be a finite number >= 0 (got {wait:g})")
        elif _finite(opts.timeout_s) and opts.timeout_s > 0 and wait >= 1e3 * opts.timeout_s:
            problems.append(f"--batch-wait-ms {wait:g} must be under the deadline, --timeout-s {opts.timeout_s:g} "
                            f"({1e3 * opts.timeout_s:g} ms): a lone request would wait for a fuller batch past it (504)")
    if not _finite(opts.max_body_mb) or opts.max_body_mb * 2**20 < 1:
        problems.append(f"--max-body-mb must be a finite number > 0, at least one byte (got {opts.max_body_mb:g})")
    if opts.threads < 0:
        problems.append(f"--threads must be >= 0 (got {opts.threads})")
    if opts.max_queue < 0:
        problems.append(f"--max-queue must be >= 1, or 0 for the default (got {opts.max_queue})")
    if not _finite(opts.drain_timeout_s) or opts.drain_timeout_s <= 0:
        problems.append(f"--drain-timeout-s must be a finite number > 0 (got {opts.drain_timeout_s:g})")
    if opts.address:
        from ferry.cluster import check_address

        try:
            check_address(opts.address, local=True)
        except FerryError as exc:
            problems.append(str(exc))
    if problems:
        raise FerryError("; ".join(problems))
    if opts.address is None:
        _check_port_free(opts.host, opts.port)


def http_url(host: str, port: int) -> str:
    """The server's address as a URL; an IPv6 address in brackets (http://[::1]:8000)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound here and handed to uvicorn (inherited by its worker processes), so
    that the banner can show the port really bound (with --port 0, the one the system picked)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FerryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


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


def app_config(opts: ServeOptions, *, request_id_header: bool = True):
    from ferry.serve.app import AppConfig

    return AppConfig(api_key=opts.api_key, max_body_bytes=int(opts.max_body_mb * 2**20), max_queue=queue_per_unit(opts),
                     timeout_s=opts.timeout_s, request_id_header=request_id_header, drain_timeout_s=opts.drain_timeout_s)


def drain_windows(drain_timeout_s: float) -> tuple[float, float]:
    """(seconds to wait for the admitted requests, seconds left to uvicorn to close connections)."""
    wait = max(0.8 * drain_timeout_s, drain_timeout_s - 3.0)
    return wait, drain_timeout_s - wait


class _Lifecycle:
    """Signals of one server process: SIGTERM/SIGINT drain then stop, SIGHUP reloads."""

    def __init__(self, opts: ServeOptions, supervisor_pid: int | None, log) -> None:
        self.opts, self.supervisor_pid, self.log = opts, supervisor_pid, log
        self.app = None
        self.waiters: list[asyncio.Future] = []
        self.stopping = False

    async def startup(self, app) -> None:
        self.app = app
        if self.supervisor_pid is not None:
            app.state.reload = self.reload_everywhere
        if threading.current_thread() is not threading.main_thread():
            return  # not a server process of ours (an in-process test client): no signals
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop, sig, signal.getsignal(sig))
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_here("SIGHUP")))

    def on_stop(self, sig: int, uvicorn_handler) -> None:
        state = self.app.state
        if state.draining:
            if sig == signal.SIGINT and callable(uvicorn_handler):  # Ctrl-C again: stop now
                uvicorn_handler(sig, None)
            return  # a SIGTERM after Ctrl-C (the supervisor's) changes nothing
        state.draining = True
        wait, _ = drain_windows(self.opts.drain_timeout_s)
        self.log(f"ferry serve [{os.getpid()}]: {signal.Signals(sig).name}: draining ({state.busy} request(s) in flight; "
                 f"new predictions get 503; at most {self.opts.drain_timeout_s:g} s)")
        asyncio.get_running_loop().create_task(self._drain(sig, uvicorn_handler, wait))

    async def _drain(self, sig: int, uvicorn_handler, wait: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        state = self.app.state
        while state.busy and loop.time() < end:
            await asyncio.sleep(0.02)
        if state.busy:
            self.log(f"ferry serve [{os.getpid()}]: {state.busy} request(s) still in flight after {wait:g} s; stopping")
        if callable(uvicorn_handler):
            uvicorn_handler(sig, None)  # uvicorn closes the connections and stops
        else:  # pragma: no cover - not under uvicorn's signal handling
            signal.raise_signal(sig)

    async def reload_here(self, why: str):
        state = self.app.state
        state.reloading += 1
        try:
            result = await self.app.backend.reload()
        finally:
            state.reloading -= 1
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(result)
        self.waiters.clear()
        if not result.ok:
            from ferry.serve.app import LOG

            LOG.warning("%s: %s", why, result.error)
        else:
            self.log(f"ferry serve [{os.getpid()}]: {why}: reloaded "
                     + ", ".join(f"{m['name']} ({m['load_seconds']:.2f} s)" for m in result.models))
        return result

    async def reload_everywhere(self):
        """--workers N: the supervisor forwards SIGHUP to every worker; answer with this worker's reload."""
        from ferry.serve.backend import ReloadResult

        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        os.kill(self.supervisor_pid, signal.SIGHUP)
        try:
            return await asyncio.wait_for(fut, 300)
        except asyncio.TimeoutError:
            return ReloadResult(False, error="reload failed: no reload within 300 s")


def build_app(opts: ServeOptions, *, log=say):
    """Models (loaded and warmed), batching backend, metrics and app, for one process."""
    from ferry.serve.app import ServerState, create_app
    from ferry.serve.backend import LocalBackend
    from ferry.serve.metrics import MULTIPROC_ENV, ServeMetrics

    metrics = ServeMetrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV) or None)
    backend = LocalBackend(opts.models, provider=opts.provider, threads=threads_per_process(opts),
                           max_batch_size=opts.max_batch_size, batch_wait_ms=opts.batch_wait_ms, metrics=metrics)
    supervisor = os.environ.get(SUPERVISED_ENV)
    life = _Lifecycle(opts, int(supervisor) if supervisor else None, log)

    async def shutdown() -> None:
        await backend.close()
        metrics.mark_dead()

    return create_app(backend, app_config(opts), state=ServerState(), metrics=metrics, on_startup=life.startup,
                      on_shutdown=shutdown)


def configure_logging() -> None:
    """One line per record with its time; ferry.serve at INFO (reloads), everything else at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ferry.serve").setLevel(logging.INFO)


def app_from_env():
    """uvicorn's factory in each worker process of `--workers N`."""
    configure_logging()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while this worker loads: it is reading the files now
    opts = ServeOptions(**json.loads(os.environ[CONFIG_ENV]))
    resolve_api_key(opts)
    return build_app(opts)


def describe(opts: ServeOptions, app, port: int) -> str:
    """The banner of one server process listening on `port` (the port bound: --port 0 picks one)."""
    backend = app.backend
    models = ", ".join(f"{n} ({c.provider.describe()})" for n, c in backend.models.items())
    return (f"ferry serve: {http_url(opts.host, port)}  models: {models}; batching: up to {backend.max_batch_size}, "
            f"wait {backend.batch_wait_ms:g} ms; queue {app.config.max_queue} per model, deadline {opts.timeout_s:g} s; "
            f"{opts.workers} process(es)" + ("; API key required" if opts.api_key else ""))


def _supervisor(multiprocess_dir: str):
    """uvicorn's worker supervisor, but SIGHUP reloads the models in every worker in place (uvicorn
    would replace the workers), and a worker that died leaves the live gauges."""
    from prometheus_client import multiprocess
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_hup(self) -> None:
            for process in self.processes:
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGHUP)

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()
            for pid in before - {p.pid for p in self.processes}:
                if pid is not None:
                    multiprocess.mark_process_dead(pid, multiprocess_dir)
                    say(f"ferry serve: worker [{pid}] died or stopped answering; started another (it loads the model "
                        "files as they are now)")

    return Supervisor


def serve_local(opts: ServeOptions, *, log=say) -> int:
    import uvicorn

    from ferry.serve.metrics import MULTIPROC_ENV

    check_options(opts)
    configure_logging()
    _, grace = drain_windows(opts.drain_timeout_s)
    common = dict(host=opts.host, port=opts.port, log_level="warning", access_log=False, lifespan="on",
                  timeout_graceful_shutdown=max(1, math.ceil(grace)))
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was there before it: make that a no-op, so a requested stop exits 0.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # while the models load (they are being read now): not the default, death
    if opts.workers == 1:
        os.environ.pop(MULTIPROC_ENV, None)  # one process: its own registry
        os.environ.pop(SUPERVISED_ENV, None)
        app = build_app(opts, log=log)  # a bad model fails here, before the port is opened
        sock = bind_socket(opts.host, opts.port)
        log(describe(opts, app, sock.getsockname()[1]))
        uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[sock])
        if stopped:
            log(f"ferry serve: stopped by {signal.Signals(stopped[0]).name} after the requests in flight")
        return 0

    from ferry.serve.backend import load_models

    load_models(opts.models, provider=opts.provider, threads=1)  # check the models once, in this process
    folder = tempfile.mkdtemp(prefix="ferry-serve-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    os.environ[SUPERVISED_ENV] = str(os.getpid())
    os.environ[CONFIG_ENV] = json.dumps({**asdict(opts), "api_key": None})  # workers read the key as this process did
    if opts.api_key and not opts.api_key_file:
        os.environ[API_KEY_ENV] = opts.api_key
    try:
        # a worker loading or warming a large model holds the GIL for a while: not a hung worker (uvicorn: 5 s)
        config = uvicorn.Config("ferry.serve.local:app_from_env", factory=True, workers=opts.workers,
                                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **common)
        sock = bind_socket(opts.host, opts.port)
        log(f"ferry serve: {http_url(opts.host, sock.getsockname()[1])}  {opts.workers} worker processes, "
            f"{threads_per_process(opts)} onnxruntime thread(s) each; queue {queue_per_unit(opts)} per model and process, "
            f"deadline {opts.timeout_s:g} s" + ("; API key required" if opts.api_key else ""))
        _supervisor(folder)(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log("ferry serve: stopped after the requests in flight")
    return 0
