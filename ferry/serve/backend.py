"""What answers a request once its image is decoded: the models, and dynamic batching.

`LocalBackend` batches in-process: requests for one model wait in a queue; a single loop per model
takes whatever is queued (up to `max_batch_size`), optionally waits `batch_wait_ms` for more, and
runs one onnxruntime call in a worker thread. With no wait (the CPU default) a lone request is
never delayed, and under load the requests that piled up during one call form the next batch:
batching costs nothing where it does not pay. The Ray Serve host (ray_host.py) implements the same
`infer` with `@serve.batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ferry.core.errors import FerryError


class Backend(Protocol):
    models: dict[str, Any]  # name -> Classifier or Detector

    async def infer(self, name: str, x: np.ndarray) -> np.ndarray:
        """Logits (classes,) for one prepared (C, H, W) input of model `name`."""

    def stats(self) -> dict[str, dict[str, float]]:
        """Per model: requests, batches, mean batch size."""


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "batches": self.batches,
                "mean_batch_size": self.requests / self.batches if self.batches else 0.0}


def load_models(paths: Sequence[str | Path], *, provider: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Classifiers (and detectors) keyed by the model name in their metadata (`mnist-cnn`, `resnet50`).
    When an fp32 model and its variant are served together, the variant is `<name>.<precision>`."""
    from ferry.runtime import open_model

    if not paths:
        raise FerryError("give at least one model (.onnx written by `ferry export`)")
    clfs = [open_model(p, provider=provider, threads=threads) for p in paths]
    shared = {c.name for c in clfs if sum(o.name == c.name for o in clfs) > 1}
    models: dict[str, Any] = {}
    for clf in clfs:
        precision = clf.metadata.precision
        name = f"{clf.name}.{precision}" if clf.name in shared and precision != "fp32" else clf.name
        if name in models:
            raise FerryError(f"two models are named {name!r} ({models[name].path} and {clf.path}); export one with --name")
        models[name] = clf
    return models


def default_wait_ms(models: dict[str, Any]) -> float:
    """Waiting for a fuller batch pays on a GPU (throughput grows with the batch); on a CPU it
    does not: a CPU is already busy at batch 1 (docs: "Serving")."""
    return 2.0 if any(clf.provider.is_gpu for clf in models.values()) else 0.0


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future


@dataclass
class Batcher:
    """Dynamic batching for one model, on the event loop that created it."""

    clf: Any
    max_batch_size: int
    wait_s: float
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(x, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.wait_s > 0:
                deadline = asyncio.get_running_loop().time() + self.wait_s
                while len(batch) < self.max_batch_size:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            live = [it for it in batch if not it.future.done()]  # a client that went away is not computed
            if not live:
                continue
            try:
                logits = await asyncio.to_thread(self.clf.infer, np.stack([it.x for it in live]))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            self.stats.requests += len(live)
            self.stats.batches += 1
            for it, row in zip(live, logits):
                if not it.future.done():
                    it.future.set_result(row)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class LocalBackend:
    """The one-process host's backend: one Batcher per model."""

    def __init__(self, models: dict[str, Any], *, max_batch_size: int = 8, batch_wait_ms: float | None = None) -> None:
        if max_batch_size < 1:
            raise FerryError(f"--max-batch-size must be >= 1 (got {max_batch_size})")
        wait = default_wait_ms(models) if batch_wait_ms is None else batch_wait_ms
        if wait < 0:
            raise FerryError(f"--batch-wait-ms must be >= 0 (got {wait})")
        self.models = models
        self.max_batch_size, self.batch_wait_ms = max_batch_size, wait
        self.batchers = {name: Batcher(clf, max_batch_size, wait / 1000.0) for name, clf in models.items()}

    async def infer(self, name: str, x: np.ndarray) -> np.ndarray:
        return await self.batchers[name].submit(x)

    def stats(self) -> dict[str, dict[str, float]]:
        return {name: b.stats.as_dict() for name, b in self.batchers.items()}

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
