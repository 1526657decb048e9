"""The cluster host: the same app (`create_app`) as ingress of a Ray Serve deployment, replicas
across the cluster, batching by `@serve.batch`. Each replica loads the models from their paths:
on a cluster they must be on a path every node can read (a shared file system, or a runtime_env)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.serve.local import ServeOptions, check_options

APP_NAME = "ferry"


def _deployment_class():
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class FerryDeployment:
        """One replica: the models, a batched `infer`, and the shared app over them."""

        def __init__(self, paths: list[str], provider: str, threads: int, max_batch_size: int, wait_ms: float,
                     api_key: str | None, max_body_bytes: int) -> None:
            from ferry.serve.backend import BatchStats, load_models

            self.models = load_models(paths, provider=provider, threads=threads)
            self._stats = {name: BatchStats() for name in self.models}
            self._batched.set_max_batch_size(max_batch_size)
            self._batched.set_batch_wait_timeout_s(wait_ms / 1000.0)
            self._app_args = {"api_key": api_key, "max_body_bytes": max_body_bytes}

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
        async def _batched(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
            import asyncio

            out: list[Any] = [None] * len(items)
            for name in dict.fromkeys(n for n, _ in items):
                idx = [i for i, (n, _) in enumerate(items) if n == name]
                logits = await asyncio.to_thread(self.models[name].infer, np.stack([items[i][1] for i in idx]))
                self._stats[name].requests += len(idx)
                self._stats[name].batches += 1
                for i, row in zip(idx, logits):
                    out[i] = row
            return out

        async def infer(self, name: str, x: np.ndarray) -> np.ndarray:
            return await self._batched((name, x))

        def stats(self) -> dict[str, dict[str, float]]:
            return {name: s.as_dict() for name, s in self._stats.items()}

        def __serve_build_asgi_app__(self):
            from ferry.serve.app import create_app

            return create_app(self, **self._app_args)

    return FerryDeployment


def deploy(opts: ServeOptions, *, threads: int = 1, cpus_per_replica: float = 1.0) -> str:
    """Deploy on the Ray Serve of the connected Ray (ray.init done by the caller); return the URL."""
    from ray import serve

    from ferry.serve.backend import default_wait_ms, load_models

    models = load_models(opts.models, provider="cpu", threads=1)  # fail here, with a clear error, not in a replica
    wait = default_wait_ms(models) if opts.batch_wait_ms is None else opts.batch_wait_ms
    serve.start(http_options={"host": opts.host, "port": opts.port})
    deployment = _deployment_class().options(
        num_replicas=opts.replicas,
        max_ongoing_requests=max(32, 2 * opts.max_batch_size),  # at least a batch in flight per replica
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    app = deployment.bind([str(Path(p).resolve()) for p in opts.models], opts.provider, threads, opts.max_batch_size,
                          wait, opts.api_key, int(opts.max_body_mb * 2**20))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{opts.host}:{opts.port}"


def serve_on_ray(opts: ServeOptions, *, log=print) -> int:
    from ray import serve

    from ferry.cluster import start_ray

    check_options(opts)
    address = None if opts.address == "local" else opts.address
    started, seconds = start_ray(address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(opts)
        log(f"ferry serve: {url} on Ray Serve ({opts.replicas} replica(s); Ray {'started' if address is None else 'joined'} "
            f"in {seconds:.1f} s); Ctrl-C or SIGTERM stops it")
        stop.wait()
        log("ferry serve: stopping (requests in flight finish first)")
        serve.delete(APP_NAME)
        serve.shutdown()
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray Serve's deployment errors become one line
        raise FerryError(f"Ray Serve deployment failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0
