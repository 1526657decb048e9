"""The cluster host: the same app (`create_app`) as ingress of a Ray Serve deployment, replicas
across the cluster, batching by `@serve.batch`. Each replica loads the models from their paths:
on a cluster they must be on a path every node can read (a shared file system, or a runtime_env).

A small control actor (`FerryControl`, no CPU reserved) ties the replicas together: every
heartbeat (HEARTBEAT_S) each replica sends it a snapshot of its metrics and how many requests it
holds, and learns whether to drain or reload. So `/metrics` and `/v1/stats` cover every replica (the
answering replica's own figures fresh, the others' at most a heartbeat old), SIGTERM drains every
replica before Ray Serve is shut down, and SIGHUP or POST /v1/admin/reload reloads every replica.
It also names the `ferry serve` that deployed the app: a second deployment on the same cluster is
refused with that name unless --replace, whose deployment kills the control actor, so that the
replaced `ferry serve` sees it gone and exits without touching the new app.

`--address local` starts a local Ray in a child process of its own session (`python -m
ferry.serve.ray_host --local-ray`), so that a signal sent to this process's group (Ctrl-C, or a
supervisor's SIGTERM to the group) reaches this process alone: it drains, shuts Ray Serve down, and
only then stops that Ray, which also stops when this process dies (it reads its stdin to the end).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.serve.local import ServeOptions, check_options, drain_windows, http_url, is_loopback, queue_per_unit, say

APP_NAME = "ferry"
CONTROL_NAME = "ferry-serve-control"
CONTROL_NAMESPACE = "ferry"
HEARTBEAT_S = 0.25
STALE_S = 5.0  # a replica not heard from for this long is gone (scaled down, died)
REPLACED_CHECK_S = 1.0  # how often `ferry serve --address` checks that its app was not replaced (--replace)


def _control_class():
    import ray

    @ray.remote(num_cpus=0)
    class FerryControl:
        """What the replicas share: the latest metrics of each, draining, and reload generations."""

        def __init__(self, owner: dict[str, Any] | None = None) -> None:
            self.draining = False
            self.generation = 0
            self.replicas: dict[str, dict[str, Any]] = {}
            self.owner = owner or {}  # the `ferry serve` that deployed the app: host, pid, models

        def whose(self) -> dict[str, Any]:
            return self.owner

        def heartbeat(self, replica: str, snapshot: list, busy: int, draining: bool, generation: int,
                      result: dict | None) -> tuple[bool, int]:
            """A replica's news (`busy`: requests it holds, counted while it was `draining` or not);
            returns whether to drain and the reload generation to reach."""
            self.replicas[replica] = {"snapshot": snapshot, "busy": busy, "generation": generation, "result": result,
                                      "seen": time.monotonic(), "draining": draining}
            return self.draining, self.generation

        def _live(self) -> dict[str, dict[str, Any]]:
            now = time.monotonic()
            return {k: v for k, v in self.replicas.items() if now - v["seen"] < STALE_S}

        def snapshots(self, exclude: str = "") -> list:
            return [v["snapshot"] for k, v in self._live().items() if k != exclude]

        def drain(self) -> None:
            self.draining = True

        def request_reload(self) -> int:
            self.generation += 1
            return self.generation

        def status(self) -> dict[str, dict[str, Any]]:
            return {k: {key: v[key] for key in ("busy", "generation", "result", "draining")} for k, v in self._live().items()}

    return FerryControl


class RayEntry:
    """One model of one replica's generation, batched by the deployment's `@serve.batch`."""

    def __init__(self, owner, name: str, clf: Any) -> None:
        self.owner, self.name, self.clf = owner, name, clf
        self.users = 0
        self.depth = owner.metrics.gauge("queue_depth", name)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        taken = [False]
        self.depth.inc()
        try:
            out = await self.owner._batched((self, x, taken))
            if isinstance(out, BaseException):  # this model's call failed: its requests fail, no one else's
                raise out
            return out
        finally:
            if not taken[0]:  # dropped by @serve.batch (past its deadline) or failed before its batch
                self.depth.dec()

    def release(self) -> None:
        self.users -= 1


def _deployment_class():
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class FerryDeployment:
        """One replica: the models, a batched `infer`, and the shared app over them."""

        def __init__(self, paths: list[str], provider: str, threads: int, max_batch_size: int, wait_ms: float,
                     app_config: dict[str, Any], control) -> None:
            from ferry.serve.app import ServerState
            from ferry.serve.backend import load_and_warm
            from ferry.serve.metrics import ServeMetrics

            self.paths, self.provider, self.threads, self.max_batch_size = paths, provider, threads, max_batch_size
            self.metrics = ServeMetrics()
            self.control = control
            self.replica = uuid.uuid4().hex[:12]
            self.generation = 0  # the control's reload generation this replica has acted on
            self.last_result: dict[str, Any] | None = None
            self.state = ServerState()
            self._install(*load_and_warm(paths, provider=provider, threads=threads, max_batch_size=max_batch_size))
            self._batched.set_max_batch_size(max_batch_size)
            self._batched.set_batch_wait_timeout_s(wait_ms / 1000.0)
            self._app_config = app_config
            self._reload_lock: asyncio.Lock | None = None
            self._heartbeat: asyncio.Task | None = None

        def _install(self, models: dict[str, Any], seconds: dict[str, float]) -> None:
            self.models, self.load_seconds = models, seconds
            self.entries = {name: RayEntry(self, name, clf) for name, clf in models.items()}
            for name, s in seconds.items():
                self.metrics.model_loaded(name, s)

        # --- the Backend interface (backend.py) -----------------------------------------------

        def entry(self, name: str):
            e = self.entries.get(name)
            if e is not None:
                e.users += 1
            return e

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
        async def _batched(self, items: list[tuple[RayEntry, np.ndarray, list]]) -> list[Any]:
            """One batch of Ray Serve's, which may mix models: each model's requests run as one call.
            A model's failure is handed to its own requests (`RayEntry.submit` raises it); raised
            here, Ray Serve would fail every request of the batch, other models' too."""
            loop = asyncio.get_running_loop()
            out: list[Any] = [None] * len(items)
            for entry in dict.fromkeys(e for e, _, _ in items):
                idx = [i for i, (e, _, _) in enumerate(items) if e is entry]
                for i in idx:
                    items[i][2][0] = True
                entry.depth.dec(len(idx))
                try:
                    logits = await loop.run_in_executor(None, entry.clf.infer, np.stack([items[i][1] for i in idx]))
                except Exception as exc:  # noqa: BLE001 - this model's requests get it, the others go on
                    logits = [exc] * len(idx)
                else:
                    self.metrics.batch(entry.name, len(idx))
                for i, row in zip(idx, logits):
                    out[i] = row
            return out

        async def stats(self) -> dict[str, Any]:
            from ferry.serve.backend import parse_page, stats_from_metrics

            got = stats_from_metrics(parse_page(await self.metrics_page()))
            return {name: got.get(name, {"requests": 0, "batches": 0, "mean_batch_size": 0.0}) for name in self.models}

        async def metrics_page(self) -> bytes:
            from ferry.serve.metrics import merge

            others = await self.control.snapshots.remote(self.replica)
            replicas = ("ferry_replicas", "gauge", "Ray Serve replicas whose metrics this page sums",
                        [("ferry_replicas", {}, float(len(others) + 1))])
            return merge([self.metrics.snapshot(), *others], extra=[replicas])

        async def reload(self):
            """POST /v1/admin/reload: every replica reloads (through the control actor); the answer
            waits for all of them and reports the first failure."""
            from ferry.serve.backend import ReloadResult

            generation = await self.control.request_reload.remote()
            end = time.monotonic() + 300
            while time.monotonic() < end:
                status = await self.control.status.remote()
                if status and all(s["generation"] >= generation for s in status.values()):
                    failed = [s["result"] for s in status.values() if s["result"] and not s["result"]["ok"]]
                    if failed:
                        return ReloadResult(False, error=failed[0]["error"], generation=generation)
                    return ReloadResult(True, self._describe_models(), generation=generation)
                await asyncio.sleep(HEARTBEAT_S / 2)
            return ReloadResult(False, error="reload failed: not every replica reloaded within 300 s")

        def _describe_models(self) -> list[dict[str, Any]]:
            return [{"name": n, "path": str(c.path), "load_seconds": round(self.load_seconds[n], 4)}
                    for n, c in self.models.items()]

        async def _reload_here(self, generation: int) -> None:
            from ferry.serve.backend import load_and_warm, reload_failure

            if self._reload_lock is None:
                self._reload_lock = asyncio.Lock()
            async with self._reload_lock:
                self.state.reloading += 1
                try:
                    loaded = await asyncio.to_thread(load_and_warm, self.paths, provider=self.provider, threads=self.threads,
                                                     max_batch_size=self.max_batch_size)
                except Exception as exc:  # noqa: BLE001 - a bad new file: the current models keep serving
                    self.metrics.reloads.labels("failed").inc()
                    self.last_result = {"ok": False, "error": "reload failed, still serving the previous models: "
                                                              + reload_failure(exc)}
                else:
                    self._install(*loaded)  # requests in flight keep their entries (the previous models)
                    self.metrics.reloads.labels("ok").inc()
                    self.last_result = {"ok": True}
                finally:
                    self.state.reloading -= 1
                    self.generation = generation

        # --- the heartbeat ----------------------------------------------------------------------

        async def _beat(self) -> None:
            while True:
                try:
                    draining, generation = await self.control.heartbeat.remote(
                        self.replica, self.metrics.snapshot(), self.state.busy, self.state.draining, self.generation,
                        self.last_result)
                except Exception:  # noqa: BLE001 - the control actor is gone (the driver stopped): keep serving
                    await asyncio.sleep(1.0)
                    continue
                if draining:
                    self.state.draining = True
                if generation > self.generation:
                    await self._reload_here(generation)
                    continue  # report the result at once
                await asyncio.sleep(HEARTBEAT_S)

        async def _startup(self, _app) -> None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

        async def _shutdown(self) -> None:
            if self._heartbeat is not None:
                self._heartbeat.cancel()

        def __serve_build_asgi_app__(self):
            from ferry.serve.app import AppConfig, create_app

            return create_app(self, AppConfig(**self._app_config, request_id_header=False), state=self.state,
                              metrics=self.metrics, on_startup=self._startup, on_shutdown=self._shutdown)

    return FerryDeployment


def deploy(opts: ServeOptions, *, cpus_per_replica: float = 1.0) -> tuple[str, Any]:
    """Deploy on the Ray Serve of the connected Ray (ray.init done by the caller); return the URL and
    the app's control actor (this deployment's own: `_replaced` watches it, `undeploy` kills it).
    Each replica runs `opts.threads` onnxruntime threads (0: 1) and reserves `cpus_per_replica`.
    A ferry app already running there is replaced only with `opts.replace` (`_check_running_app`)."""
    import ray
    from ray import serve

    from ferry.serve.backend import default_wait_ms, load_models

    models = load_models(opts.models, provider="cpu", threads=1)  # fail here, with a clear error, not in a replica
    wait = default_wait_ms(models) if opts.batch_wait_ms is None else opts.batch_wait_ms
    queue = queue_per_unit(opts)
    _check_serve_http(opts)  # before anything of a running app is touched
    _check_running_app(opts.replace)
    previous = _control()
    if previous is not None:  # --replace: the `ferry serve` that owns it sees it gone and exits, leaving the app alone
        ray.kill(previous)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "models": sorted(models)}
    control = _control_class().options(name=CONTROL_NAME, namespace=CONTROL_NAMESPACE).remote(owner)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    ongoing = queue * len(models) + 8  # the app admits `queue` per model and refuses the rest at once
    deployment = _deployment_class().options(
        num_replicas=opts.replicas,
        max_ongoing_requests=ongoing,
        max_queued_requests=ongoing * opts.replicas,  # beyond it Ray Serve's router answers 503 itself
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    app_config = {"api_key": opts.api_key, "max_body_bytes": int(opts.max_body_mb * 2**20), "max_queue": queue,
                  "timeout_s": opts.timeout_s, "drain_timeout_s": opts.drain_timeout_s}
    app = deployment.bind([str(Path(p).resolve()) for p in opts.models], opts.provider, opts.threads or 1,
                          opts.max_batch_size, wait, app_config, control)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return http_url(opts.host, opts.port), control


def _check_serve_http(opts: ServeOptions) -> None:
    """Ray Serve keeps the HTTP address it was first started with and ignores another (it only logs
    a warning): on a cluster whose Serve already runs, ferry's app would be reached there, maybe on
    every interface without the key that --host 127.0.0.1 made optional. A FerryError unless it is
    the address asked for."""
    from ray.serve.context import _get_global_client  # Serve's own accessor (ray.serve.api uses it)

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    http = client.http_config
    if (http.host, http.port) != (opts.host, opts.port):
        raise FerryError(f"Ray Serve on this cluster already serves HTTP at {http.host}:{http.port} (it keeps the address "
                         f"it started with): give --host {http.host} --port {http.port}"
                         + ("" if is_loopback(http.host) else " and an API key") + ", or stop Serve first (serve shutdown)")


def _check_running_app(replace: bool) -> None:
    """ferry's app has one name and one route prefix (/) on a cluster's Ray Serve: a second deployment
    would replace the running one (serve.run does so silently). A FerryError naming the running app
    and whose it is, unless `replace`; another application on the prefix / is always refused."""
    import ray
    from ray.serve.context import _get_global_client  # Serve's own accessor (ray.serve.api uses it)

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    apps = client.get_serve_details().get("applications", {})
    for name, app in sorted(apps.items()):
        status = str(app.get("status", "")).rsplit(".", 1)[-1]
        if status == "DELETING" and name == APP_NAME:  # a `ferry serve` stopping: its delete would take a new app with it
            raise FerryError(f"Ray Serve on this cluster is still deleting ferry's application {APP_NAME!r} (a `ferry "
                             "serve` stopping); run again in a few seconds")
        if status == "DELETING":
            continue
        if name != APP_NAME:
            if app.get("route_prefix") == "/":
                raise FerryError(f"Ray Serve on this cluster already serves the application {name!r} at the route prefix "
                                 f"/, which ferry's app needs: stop that application first")
            continue
        if replace:
            return
        control = _control()
        owner = {}
        if control is not None:
            try:
                owner = ray.get(control.whose.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - an unanswering control actor: its owner is unknown
                owner = {}
        if owner:
            whose = (f"models {', '.join(owner.get('models', [])) or '-'}, deployed by `ferry serve` (pid "
                     f"{owner.get('pid')} on {owner.get('host')})")
            hint = "stop that `ferry serve` first, or give --replace to replace its app (it then exits)"
        else:
            whose = "left by a `ferry serve` that is no longer running" if control is None else "of an unknown `ferry serve`"
            hint = "give --replace to replace it"
        raise FerryError(f"Ray Serve on this cluster already runs ferry's application {APP_NAME!r} "
                         f"({status or 'status unknown'}; {whose}): a second deployment would replace it; {hint}")


def _control():
    import ray

    try:
        return ray.get_actor(CONTROL_NAME, namespace=CONTROL_NAMESPACE)
    except ValueError:
        return None


def _replaced(control) -> bool:
    """Whether another `ferry serve --replace` took this deployment's app over: its control actor
    (`control`) is dead and another one holds the name. An actor unreachable for a moment, or dead
    with nothing in its place (its node lost), is not a replacement."""
    import ray

    if control is None:  # never found: nothing to watch
        return False
    try:
        ray.get(control.whose.remote(), timeout=10)
    except ray.exceptions.ActorUnavailableError:  # for a moment: asked again at the next check
        return False
    except ray.exceptions.RayActorError:
        current = _control()
        return current is not None and current != control
    except Exception:  # noqa: BLE001 - slow to answer (a busy cluster): still ours
        return False
    return False


def undeploy(control=None) -> None:
    """Delete the application and its control actor (Ray Serve itself keeps running). `control`: the
    deployment's own (`deploy`); when another `ferry serve --replace` has taken the app over since,
    nothing is touched. None: whatever holds the name."""
    import ray
    from ray import serve

    if control is not None and _replaced(control):
        return
    serve.delete(APP_NAME)
    control = control or _control()
    if control is not None:
        ray.kill(control)


def drain(timeout_s: float, log=print, control=None) -> bool:
    """Tell every replica to drain and wait until none holds a request (True) or `timeout_s` passes.
    `control`: this process's control actor (default: the one named on the cluster)."""
    import ray

    control = control or _control()
    if control is None:
        return True
    ray.get(control.drain.remote())
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = ray.get(control.status.remote())
        if all(s["draining"] and s["busy"] == 0 for s in status.values()):  # counted once draining: final
            return True
        time.sleep(0.05)
    return False


def reload_all(timeout_s: float = 300, control=None) -> tuple[bool, str]:
    """SIGHUP: every replica reloads; (all ok, what happened). `control` as for `drain`."""
    import ray

    control = control or _control()
    generation = ray.get(control.request_reload.remote())
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = ray.get(control.status.remote())
        if status and all(s["generation"] >= generation for s in status.values()):
            failed = [s["result"]["error"] for s in status.values() if s["result"] and not s["result"]["ok"]]
            return (False, failed[0]) if failed else (True, f"reloaded on {len(status)} replica(s)")
        time.sleep(0.1)
    return False, "reload failed: not every replica reloaded in time"


class LocalRay:
    """A local Ray in a child process of its own session; this process joins it as a driver."""

    def __init__(self, log=print) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> str:
        """Start it; return its address, with this process set up to join it (its token mode)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry.serve.ray_host", "--local-ray"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = box[0].strip() if box else ""
        if not line.startswith("address="):
            exited = self.proc.poll() is not None
            self.stop()
            raise FerryError("the local Ray failed to start (its error is above)" if exited
                             else f"the local Ray did not start within {timeout_s:g} s")
        address, _, auth = line.split("=", 1)[1].partition(" auth=")
        if auth:  # Ray joins an explicit address with token authentication only when told to (before its import)
            os.environ["RAY_AUTH_MODE"] = auth
        return address

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # the child shuts its Ray down and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _local_ray_main() -> int:
    """The child of LocalRay: start Ray, print its address, hold it until stdin closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides when; a dead parent closes stdin
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default for a new local cluster (set before its import)
    import ray

    from ferry.cluster import start_ray

    try:
        start_ray(None)
    except Exception as exc:  # noqa: BLE001 - one line for the parent's user, no traceback
        print(f"ferry serve: local Ray: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr, flush=True)
        return 1
    auth = os.environ.get("RAY_AUTH_MODE", "")  # ray.init sets it to "token" for a new local cluster
    print(f"address={ray.get_runtime_context().gcs_address}" + (f" auth={auth}" if auth else ""), flush=True)
    sys.stdin.read()
    ray.shutdown()
    return 0


def serve_on_ray(opts: ServeOptions, *, log=None) -> int:
    log = log or say
    check_options(opts)
    stop = threading.Event()
    hup = threading.Event()
    stopped_by: list[int] = []

    def on_stop(signum, _frame):
        stopped_by.append(signum)
        stop.set()

    local = LocalRay(log) if opts.address == "local" else None
    started = False
    t0 = time.perf_counter()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app is up: a reload asked for meanwhile is no death
    try:
        # the local Ray starts before this process imports ray: ray reads its token mode at import
        address = local.start() if local is not None else None
        import ray

        from ferry.cluster import quiet_ray_data, start_ray

        if local is not None:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            quiet_ray_data()
            started = True
        else:
            started, _ = start_ray(opts.address)
        seconds = time.perf_counter() - t0
        url, control = deploy(opts)  # control: this deployment's; it goes if another `ferry serve --replace` takes over
        # after ray.init, whose core worker installs its own SIGTERM handler (a stack dump, then exit)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
        log(f"ferry serve: {url} on Ray Serve ({opts.replicas} replica(s), {opts.threads or 1} onnxruntime thread(s) each, "
            f"queue {queue_per_unit(opts)} per model and replica; Ray {'started' if local else 'joined'} in {seconds:.1f} s); "
            "Ctrl-C or SIGTERM stops it" + ("; API key required" if opts.api_key else ""))
        next_check = time.monotonic() + REPLACED_CHECK_S
        while not stop.wait(0.2):
            if hup.is_set():
                hup.clear()
                try:
                    ok, what = reload_all(control=control)
                except ray.exceptions.RayActorError:  # replaced (seen at the next check), or its node lost
                    ok, what = False, "reload failed: the app's control actor cannot be reached"
                if ok:
                    log(f"ferry serve: SIGHUP: {what}")
                else:
                    from ferry.serve.app import LOG

                    LOG.warning("SIGHUP: %s", what)
            if time.monotonic() >= next_check:
                if _replaced(control):
                    log(f"ferry serve: the app was replaced by another `ferry serve --replace` on this cluster; exiting "
                        f"and leaving it serving at {url}")
                    return 0
                next_check = time.monotonic() + REPLACED_CHECK_S
        t_stop = time.monotonic()
        if _replaced(control):  # taken over between two checks: the app is another's now
            log(f"ferry serve: the app was replaced by another `ferry serve --replace` on this cluster; exiting "
                f"and leaving it serving at {url}")
            return 0
        wait, _ = drain_windows(opts.drain_timeout_s)
        log(f"ferry serve: {signal.Signals(stopped_by[0]).name}: draining (new predictions get 503; at most "
            f"{opts.drain_timeout_s:g} s)")
        try:
            if not drain(wait - 2.0 if wait > 4 else wait / 2, log, control=control):
                log("ferry serve: requests still in flight at the drain timeout; stopping")
        except ray.exceptions.RayActorError:
            log("ferry serve: the app's control actor cannot be reached (replaced, or its node lost): not drained")
        if local is None:
            undeploy(control)  # a shared cluster's Ray Serve goes on serving its other applications
        # a local Ray goes down whole below (its Serve proxy answers 503 until then)
        log(f"ferry serve: stopped by {signal.Signals(stopped_by[0]).name} after the requests in flight "
            f"({time.monotonic() - t_stop:.1f} s)")
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray Serve's deployment errors become one line
        raise FerryError(f"Ray Serve deployment failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        if started:
            import ray

            ray.shutdown()
        if local is not None:
            local.stop()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--local-ray"]:
        sys.exit(_local_ray_main())
    sys.exit(f"usage: python -m ferry.serve.ray_host --local-ray (used by `ferry serve --address local`); got {sys.argv[1:]}")
