"""Prometheus metrics of `ferry serve` (`GET /metrics`, the prometheus-client text format).

One `ServeMetrics` per process. How the figures of several processes become one page depends on
the host:

- one uvicorn process: the process's own registry;
- `--workers N`: prometheus_client's multiprocess mode: each worker writes its values to memory-
  mapped files in a folder the parent process creates (`PROMETHEUS_MULTIPROC_DIR`, set before any
  worker starts) and removes on exit; a scrape that reaches any worker reads and sums them all;
- Ray Serve: each replica keeps its own registry and sends a snapshot of it (`snapshot()`) to the
  deployment's control actor every heartbeat; a scrape merges the latest snapshot of every replica
  (`merge()`), the answering replica's own figures taken fresh.

Every value is updated on the event loop's thread (or, in the Ray batch function, the replica's
loop): no lock is held across requests. Label children are resolved once and cached, so a request
costs a few dictionary look-ups and increments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NO_MODEL = "-"  # the model label of a prediction request naming no served model (bounded cardinality)

# gauges merged by max across processes and replicas; every other series is summed
_MAX_GAUGES = {"ferry_model_load_seconds"}


class ServeMetrics:
    """The server's metrics. `multiprocess_dir`: the folder of prometheus_client's multiprocess
    mode (the environment variable must already name it when prometheus_client is first imported)."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("ferry_requests", "Prediction requests answered, by model and HTTP status code "
                                "(model '-': a name this server does not serve)", ["model", "code"], registry=r)
        self.http = Counter("ferry_http_requests", "HTTP requests answered, by endpoint (path template) and status code",
                            ["path", "code"], registry=r)
        self.latency = Histogram("ferry_request_duration_seconds", "Seconds from a prediction request's arrival to its "
                                 "answer, for the predictions answered (200)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ferry_batch_size", "Requests computed together in one inference call",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("ferry_queue_depth", "Prediction requests decoded and waiting for a batch", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.in_flight = Gauge("ferry_requests_in_flight", "Prediction requests admitted and not yet answered "
                               "(reading, decoding, queued or computing)", ["model"], multiprocess_mode="livesum", registry=r)
        self.load_seconds = Gauge("ferry_model_load_seconds", "Seconds the last load of the model took, warm-up included",
                                  ["model"], multiprocess_mode="livemax", registry=r)
        self.reloads = Counter("ferry_model_reloads", "Reloads of the model files, by result (ok, failed)", ["result"],
                               registry=r)
        if multiprocess_dir is None:
            from prometheus_client import ProcessCollector

            ProcessCollector(registry=r)  # RSS, CPU seconds, open files of this process
        self._done: dict[tuple, tuple] = {}
        self._gauges: dict[tuple[str, str], Any] = {}

    # --- updates (the hot path) ---------------------------------------------------------------

    def request_done(self, path: str, model: str | None, code: int, seconds: float) -> None:
        """One answered HTTP request; `model` is set for predictions."""
        key = (path, model, code)
        children = self._done.get(key)
        if children is None:
            c = str(code)
            children = self._done[key] = (
                self.http.labels(path, c),
                self.requests.labels(model, c) if model is not None else None,
                self.latency.labels(model) if model is not None and code == 200 else None,
            )
        children[0].inc()
        if children[1] is not None:
            children[1].inc()
            if children[2] is not None:
                children[2].observe(seconds)

    def gauge(self, which: str, model: str):
        """The child of gauge `which` ("queue_depth", "in_flight") for `model`, cached."""
        key = (which, model)
        child = self._gauges.get(key)
        if child is None:
            child = self._gauges[key] = getattr(self, which).labels(model)
        return child

    def batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def model_loaded(self, model: str, seconds: float) -> None:
        self.load_seconds.labels(model).set(seconds)

    # --- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text page of this process, or of every worker in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def snapshot(self) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
        """This process's ferry_* series as plain tuples (name, type, help, samples), for merging."""
        out = []
        for metric in self.registry.collect():
            if not metric.name.startswith("ferry_"):
                continue
            samples = [(s.name, dict(s.labels), float(s.value)) for s in metric.samples if not s.name.endswith("_created")]
            out.append((metric.name, metric.type, metric.documentation, samples))
        return out

    def mark_dead(self) -> None:
        """Multiprocess mode: this process's live gauges leave the sums (at a worker's clean exit)."""
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def merge(snapshots: Iterable[list], extra: Iterable[tuple[str, str, str, list]] = ()) -> bytes:
    """One text page from several processes' `snapshot()`s: counters, histograms and gauges summed
    series by series (the model load time: the largest)."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric

    families: dict[str, tuple[str, str, dict[tuple, list]]] = {}
    for snap in [*snapshots, list(extra)]:
        for name, typ, doc, samples in snap:
            fam = families.setdefault(name, (typ, doc, {}))[2]
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                if key not in fam:
                    fam[key] = [sname, labels, value]
                elif name in _MAX_GAUGES:
                    fam[key][2] = max(fam[key][2], value)
                else:
                    fam[key][2] += value

    class _Merged:
        def collect(self):
            for name, (typ, doc, fam) in families.items():
                m = Metric(name, doc, typ)
                for sname, labels, value in fam.values():
                    m.add_sample(sname, labels, value)
                yield m

    return generate_latest(_Merged())
