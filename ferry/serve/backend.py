"""What answers a request once its image is decoded: the models, dynamic batching, reloading.

`LocalBackend` batches in-process: requests for one model wait in a queue; a single loop per model
takes whatever is queued (up to `max_batch_size`), optionally waits `batch_wait_ms` for more, and
runs one onnxruntime call in a worker thread. With no wait (the CPU default) a lone request is
never delayed, and under load the requests that piled up during one call form the next batch:
batching costs nothing where it does not pay. The Ray Serve host (ray_host.py) implements the same
interface with `@serve.batch`.

A request holds the `ModelEntry` it started with until it is answered: a reload installs new
entries for the requests that arrive after it, and retires the old ones once their last request is
answered, so a request in flight finishes on the model it was decoded for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ferry.core.errors import FerryError


class ModelEntry(Protocol):
    name: str
    clf: Any  # a ferry.runtime.Classifier or Detector
    users: int  # requests holding this entry

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Logits (classes,) for one prepared (C, H, W) input."""

    def release(self) -> None:
        """A request holding this entry is answered."""


class Backend(Protocol):
    models: dict[str, Any]  # name -> Classifier, the current generation

    def entry(self, name: str) -> ModelEntry | None:
        """The current entry of model `name` (None: not served); the caller holds it (users += 1)."""

    async def stats(self) -> dict[str, Any]:
        """Per model: requests, batches, mean batch size; across every process or replica."""

    async def metrics_page(self) -> bytes:
        """The Prometheus text page, across every process or replica."""

    async def reload(self) -> ReloadResult:
        """Load the model files again; on any failure keep the current models and say why."""


@dataclass
class ReloadResult:
    ok: bool
    models: list[dict[str, Any]] = field(default_factory=list)  # name, path, load_seconds of each (new) model
    error: str = ""
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        if self.ok:
            return {"status": "reloaded", "generation": self.generation, "models": self.models}
        return {"error": self.error}


def load_models(paths: Sequence[str | Path], *, provider: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Classifiers (and detectors) keyed by the model name in their metadata (`mnist-cnn`, `resnet50`). When an
    fp32 model and its variant are served together, the variant is `<name>.<precision>`."""
    from ferry.runtime import open_model

    if not paths:
        raise FerryError("give at least one model (.onnx written by `ferry export`)")
    clfs = [open_model(p, provider=provider, threads=threads) for p in paths]  # classifiers and detectors
    shared = {c.name for c in clfs if sum(o.name == c.name for o in clfs) > 1}
    models: dict[str, Any] = {}
    for clf in clfs:
        precision = clf.metadata.precision
        name = f"{clf.name}.{precision}" if clf.name in shared and precision != "fp32" else clf.name
        if name in models:
            raise FerryError(f"two models are named {name!r} ({models[name].path} and {clf.path}); export one with --name")
        models[name] = clf
    return models


def warm_up(clf, max_batch_size: int) -> float:
    """One call at batch 1 and one at the largest batch, so that the first requests do not pay
    onnxruntime's first-run allocations; returns the seconds taken."""
    t0 = time.perf_counter()
    shape = tuple(clf.spec.input_shape)
    for n in sorted({1, max_batch_size}):
        try:
            clf.infer(np.zeros((n, *shape), np.float32))
        except MemoryError as exc:  # numpy's ArrayMemoryError included
            raise FerryError(f"{clf.name}: not enough memory to warm it up at batch {n}: lower --max-batch-size") from exc
    return time.perf_counter() - t0


def load_and_warm(paths: Sequence[str | Path], *, provider: str, threads: int | None, max_batch_size: int
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """The models, loaded and warmed, and the seconds each took (load and warm-up)."""
    models = load_models(paths, provider=provider, threads=threads)
    return models, {name: clf.load_seconds + warm_up(clf, max_batch_size) for name, clf in models.items()}


def reload_failure(exc: BaseException) -> str:
    """One line saying why new model files could not be loaded."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, FerryError):
        return text
    return f"{type(exc).__name__}: {text[:300]}"


def default_wait_ms(models: dict[str, Any]) -> float:
    """Waiting for a fuller batch pays on a GPU (throughput grows with the batch); on a CPU it
    does not: a CPU is already busy at batch 1 (docs: "Serving")."""
    return 2.0 if any(clf.provider.is_gpu for clf in models.values()) else 0.0


def stats_from_metrics(page_families) -> dict[str, dict[str, float]]:
    """Requests, batches and mean batch size per model, from the ferry_batch_size histogram of
    parsed metric families (so they cover every process the page covers)."""
    out: dict[str, dict[str, float]] = {}
    for fam in page_families:
        if fam.name != "ferry_batch_size":
            continue
        for s in fam.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            d = out.setdefault(model, {"requests": 0, "batches": 0})
            if s.name.endswith("_sum"):
                d["requests"] = int(s.value)
            elif s.name.endswith("_count"):
                d["batches"] = int(s.value)
    for d in out.values():
        d["mean_batch_size"] = d["requests"] / d["batches"] if d["batches"] else 0.0
    return out


def parse_page(page: bytes):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(page.decode()))


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future


class Batcher:
    """Dynamic batching for one model (one ModelEntry), on the event loop that created it."""

    def __init__(self, name: str, clf: Any, max_batch_size: int, wait_s: float, metrics=None) -> None:
        self.name, self.clf = name, clf
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.users = 0
        self.retired = False
        self._depth = metrics.gauge("queue_depth", name) if metrics is not None else None

    async def submit(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self._loop())
        fut = loop.create_future()
        self.queue.put_nowait(_Item(x, fut))
        if self._depth is not None:
            self._depth.inc()
        return await fut

    def _took(self, n: int) -> None:
        if self._depth is not None and n:
            self._depth.dec(n)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            if self.wait_s > 0:
                deadline = loop.time() + self.wait_s
                while len(batch) < self.max_batch_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self._took(len(batch))
            live = [it for it in batch if not it.future.done()]  # past its deadline: dropped, not computed
            if not live:
                continue
            try:
                logits = await loop.run_in_executor(None, self.clf.infer, np.stack([it.x for it in live]))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            if self.metrics is not None:
                self.metrics.batch(self.name, len(live))
            for it, row in zip(live, logits):
                if not it.future.done():
                    it.future.set_result(row)

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users <= 0:
            self._stop()

    def retire(self) -> None:
        """Replaced by a reload: stop once the last request holding this entry is answered."""
        self.retired = True
        if self.users <= 0:
            self._stop()

    def _stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        left = 0  # requests dropped past their deadline and never taken: out of the queue depth
        while not self.queue.empty():
            self.queue.get_nowait()
            left += 1
        self._took(left)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class LocalBackend:
    """The one-process host's backend: one Batcher per model, reloadable."""

    def __init__(self, paths: Sequence[str | Path], *, provider: str = "auto", threads: int | None = None,
                 max_batch_size: int = 8, batch_wait_ms: float | None = None, metrics=None,
                 loaded: tuple[dict[str, Any], dict[str, float]] | None = None) -> None:
        if max_batch_size < 1:
            raise FerryError(f"--max-batch-size must be >= 1 (got {max_batch_size})")
        if batch_wait_ms is not None and batch_wait_ms < 0:
            raise FerryError(f"--batch-wait-ms must be >= 0 (got {batch_wait_ms})")
        self.paths = [str(p) for p in paths]
        self.provider, self.threads = provider, threads
        self.max_batch_size, self.metrics = max_batch_size, metrics
        models, seconds = loaded or load_and_warm(self.paths, provider=provider, threads=threads,
                                                  max_batch_size=max_batch_size)
        self._wait_ms = batch_wait_ms
        self.batch_wait_ms = default_wait_ms(models) if batch_wait_ms is None else batch_wait_ms
        self.generation = 0
        self._reloading: asyncio.Lock | None = None
        self._install(models, seconds)

    def _install(self, models: dict[str, Any], seconds: dict[str, float]) -> None:
        self.models = models
        self.load_seconds = seconds
        self.batchers = {name: Batcher(name, clf, self.max_batch_size, self.batch_wait_ms / 1000.0, self.metrics)
                         for name, clf in models.items()}
        if self.metrics is not None:
            for name, s in seconds.items():
                self.metrics.model_loaded(name, s)

    def entry(self, name: str) -> Batcher | None:
        b = self.batchers.get(name)
        if b is not None:
            b.users += 1
        return b

    def describe_models(self) -> list[dict[str, Any]]:
        return [{"name": n, "path": str(c.path), "load_seconds": round(self.load_seconds[n], 4)} for n, c in self.models.items()]

    async def reload(self) -> ReloadResult:
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            try:
                models, seconds = await asyncio.to_thread(load_and_warm, self.paths, provider=self.provider,
                                                          threads=self.threads, max_batch_size=self.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - a bad new file: the current models keep serving
                if self.metrics is not None:
                    self.metrics.reloads.labels("failed").inc()
                return ReloadResult(False, error=f"reload failed, still serving the previous models: {reload_failure(exc)}",
                                    generation=self.generation)
            old = self.batchers
            self._install(models, seconds)
            self.generation += 1
            for b in old.values():
                b.retire()
            if self.metrics is not None:
                self.metrics.reloads.labels("ok").inc()
            return ReloadResult(True, self.describe_models(), generation=self.generation)

    async def stats(self) -> dict[str, Any]:
        got = stats_from_metrics(parse_page(self.metrics.render())) if self.metrics is not None else {}
        return {name: got.get(name, {"requests": 0, "batches": 0, "mean_batch_size": 0.0}) for name in self.models}

    async def metrics_page(self) -> bytes:
        return self.metrics.render() if self.metrics is not None else b""

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
