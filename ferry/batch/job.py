"""`run_batch(options)`: batch inference on Ray Data, from a local folder to a cluster.

Ray Data reads the files' bytes; a pool of actors each holds one `Classifier` (the runtime's own
decoding, preprocessing and prediction, as `ferry predict` does), with onnxruntime's intra-op
threads set to the CPUs the actor reserves; results are written as Parquet, one row per input
(path, index, label, probability, top_k, provider, error; a detector's rows: ferry/batch/detect.py).
A bad file is a row with its error. The job checks its own output: every input path exactly once, or
it fails loudly.

Without an address a local Ray is started with bounded memory and no dashboard, and shut down at
the end; with `address` ("auto", "HOST:PORT" or "ray://HOST:PORT") the job joins a cluster.
"""

from __future__ import annotations

import glob as globlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.core.errors import FerryError

READ_CPUS = 0.25  # Ray Data's read tasks only move bytes: a small reservation keeps them from being starved
LIST_SUFFIXES = (".txt", ".lst", ".list")
READ_BATCH_BYTES = 32 * 2**20  # bytes of files a read batch aims at


@dataclass
class BatchOptions:
    """One batch job. Zero means "choose for this machine or cluster" (docs: "Batch inference")."""

    model: str
    input: str  # a folder, a glob, or a text file listing paths/URIs
    out: str  # output folder of Parquet files
    address: str | None = None  # None: a local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT": a cluster
    workers: int = 0  # actors in the pool (0: one per CPU locally, or per GPU with gpus_per_worker)
    cpus_per_worker: float = 0.0  # CPUs each actor reserves (0: share the CPUs left after reading)
    gpus_per_worker: float = 0.0  # GPUs each actor reserves (> 0 selects the CUDA provider)
    batch_size: int = 32
    top_k: int = 5
    provider: str = "auto"
    object_store_mb: int = 256  # local Ray only: the object store's size
    throttle_ms: int = 0  # sleep per batch in each actor: only to make a test job last long enough to kill an actor
    min_score: float | None = None  # detectors: detections scoring at least this (None: the runtime's default)


@dataclass
class BatchSummary:
    images: int
    failures: int
    seconds: float  # the job itself, Ray's start excluded
    ray_start_seconds: float
    out: str
    workers: int
    cpus_per_worker: float
    threads_per_worker: int
    providers: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def describe(self) -> str:
        return (f"{self.images} images, {self.failures} failed, {self.images_per_second:.1f} images/s "
                f"({self.seconds:.1f} s; starting Ray took {self.ray_start_seconds:.1f} s); {self.workers} workers x "
                f"{self.cpus_per_worker:g} CPU, {self.threads_per_worker} onnxruntime thread(s) each, provider "
                f"{', '.join(self.providers) or '-'}; results in {self.out}")


# --- inputs ------------------------------------------------------------------------------------


def _is_uri(p: str) -> bool:
    return "://" in p


def resolve_inputs(spec: str) -> list[str]:
    """A folder (its files, recursively, sorted, hidden ones skipped), a glob, a text file listing
    paths or URIs (one per line, '#' comments), a single file, or a URI (passed to Ray as is)."""
    from ferry.runtime.inputs import expand_inputs

    if _is_uri(spec):
        return _list_uri(spec)
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        items = [ln for ln in lines if ln and not ln.startswith("#")]
        return [i if _is_uri(i) else str(Path(i) if Path(i).is_absolute() else (path.parent / i)) for i in items]
    if path.exists():
        return expand_inputs([spec])
    if any(ch in spec for ch in "*?["):
        return sorted(str(p) for p in map(Path, globlib.glob(spec, recursive=True)) if p.is_file())
    raise FerryError(f"input {spec} does not exist (give a folder, a glob, or a text file listing paths)")


def _list_uri(uri: str) -> list[str]:
    """A URI of one file -> [uri]; of a folder (prefix) -> its files' URIs, recursively, sorted."""
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type != pafs.FileType.Directory:
            raise FerryError(f"input {uri} does not exist")
        base = uri.rstrip("/")
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
    except (OSError, ValueError) as exc:  # pyarrow: unknown scheme, no credentials, unreachable
        raise FerryError(f"cannot list {uri}: {str(exc).splitlines()[0][:200]}") from exc
    root = inner.rstrip("/")
    return sorted(base + f[len(root):] for f in files if not Path(f).name.startswith("."))


# --- the actor -----------------------------------------------------------------------------------


class PredictBatch:
    """One Classifier per actor; `__call__` turns a batch of (path, bytes) rows into result rows."""

    def __init__(self, model: str | Any, model_name: str, provider: str, threads: int, top_k: int, throttle_ms: int = 0,
                 min_score: float | None = None):
        """`model`: a path every node can read (a local job), or an ObjectRef of the model's bytes
        (a cluster job: the model travels once through the object store)."""
        from ferry.runtime import open_model

        if isinstance(model, str):
            path = Path(model)
        else:
            import ray

            path = Path(tempfile.mkdtemp(prefix="ferry-batch-")) / model_name
            path.write_bytes(ray.get(model))
        self.clf = open_model(path, provider=provider, threads=threads)
        self.top_k, self.throttle, self.min_score = top_k, throttle_ms / 1000.0, min_score

    def __call__(self, batch: dict[str, Any]):
        """Rows of (path, bytes, read_error) -> result rows, through the runtime's own `predict_many`."""
        import pyarrow as pa

        if self.clf.task == "detect":  # detectors: ferry/batch/detect.py
            from ferry.batch.detect import detection_table

            table = detection_table(self.clf, batch, min_score=self.min_score)
            if self.throttle:
                time.sleep(self.throttle)
            return table
        paths = [str(p) for p in batch["path"]]
        read_errors = [str(e) for e in batch["read_error"]]
        readable = [i for i, e in enumerate(read_errors) if not e]
        outcomes = dict(zip(readable, self.clf.predict_many([bytes(batch["bytes"][i]) for i in readable],
                                                            names=[paths[i] for i in readable], top_k=self.top_k,
                                                            batch_size=max(1, len(readable)))))
        out: dict[str, list] = {k: [] for k in ("path", "index", "label", "probability", "top_k", "provider", "error")}
        for i, path in enumerate(paths):
            o = outcomes.get(i)
            p = o.prediction if o else None
            out["path"].append(path)
            out["index"].append(p.index if p else None)
            out["label"].append(p.label if p else None)
            out["probability"].append(p.probability if p else None)
            out["top_k"].append([c.__dict__ for c in p.top_k] if p else [])
            out["provider"].append(self.clf.provider.used)
            out["error"].append(o.error if o else read_errors[i])
        if self.throttle:
            time.sleep(self.throttle)
        return pa.Table.from_pydict(out, schema=_schema())  # one schema for every file, null columns included


def read_files(batch: dict[str, Any]) -> dict[str, list]:
    """Rows of paths -> rows of (path, bytes, read_error: "" when read), read with plain file reads or, for a URI,
    pyarrow's filesystem for its scheme (s3://, gs://, hdfs://, ...). A file that cannot be read
    (deleted since it was listed, no permission) is a row with its error, not a failed job.

    Why not `ray.data.read_binary_files`: its own per-file machinery costs more than reading a small
    file (docs: "Batch inference"; Ray's own issue #37499 reports the same for read_images)."""
    paths = [str(p) for p in batch["path"]]
    data: list[bytes] = []
    errors: list[str] = []  # "" when read (a column of only None would not survive Ray's numpy batches)
    filesystems: dict[str, Any] = {}
    for p in paths:
        try:
            if _is_uri(p):
                fs, inner = _filesystem_for(p, filesystems)
                with fs.open_input_stream(inner) as stream:
                    data.append(stream.read())
            else:
                with open(p, "rb") as fh:
                    data.append(fh.read())
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - one unreadable file is one row's error
            data.append(b"")
            errors.append(f"{p}: cannot read: {type(exc).__name__}: {str(exc)[:200]}")
    return {"path": paths, "bytes": data, "read_error": errors}


def read_batch_rows(paths: list[str], floor: int) -> int:
    """Files per read batch: about READ_BATCH_BYTES of them (sizes from a sample of up to 100 local
    files), at least `floor` (the inference batch) and at most 1024; 256 when nothing is local."""
    sample = [p for p in paths[:: max(1, len(paths) // 100)][:100] if not _is_uri(p)]
    sizes = [os.path.getsize(p) for p in sample if os.path.isfile(p)]
    if not sizes:
        return max(floor, 256)
    return int(min(1024, max(floor, READ_BATCH_BYTES // max(1, sum(sizes) // len(sizes)))))


def _filesystem_for(uri: str, cache: dict[str, Any]) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI; one filesystem per scheme://host, as creating
    one may cost a network round trip (an S3 region lookup)."""
    import pyarrow.fs as pafs

    key = "/".join(uri.split("/", 3)[:3])
    rest = uri.split("://", 1)[1]
    if key in cache:
        fs, strip = cache[key]
        if strip is not None:
            return fs, rest[strip:]
    fs, inner = pafs.FileSystem.from_uri(uri)
    # s3://bucket/key -> "bucket/key" (strip 0); hdfs://host:port/p -> "/p" (strip the host)
    cache[key] = (fs, len(rest) - len(inner) if rest.endswith(inner) else None)
    return fs, inner


# --- Ray -----------------------------------------------------------------------------------------


def plan_workers(opts: BatchOptions, cluster_cpus: float, cluster_gpus: float) -> tuple[int, float, int]:
    """(actors, CPUs per actor, onnxruntime threads per actor: the CPUs it reserves, rounded, at
    least 1). Actors never reserve every CPU:
    Ray Data's read tasks need some, or the job hangs (2 actors of 1 CPU each on a 2-CPU node do)."""
    spare = READ_CPUS * 2
    if opts.gpus_per_worker > 0:
        workers = opts.workers or max(1, int(cluster_gpus // opts.gpus_per_worker))
    else:
        workers = opts.workers or max(1, int(cluster_cpus))
    cpus = opts.cpus_per_worker or max(0.1, math.floor(20 * (cluster_cpus - spare) / workers) / 20)
    if workers * cpus > cluster_cpus - READ_CPUS + 1e-9:
        raise FerryError(f"{workers} workers x {cpus:g} CPUs would reserve all {cluster_cpus:g} CPUs and starve Ray "
                         f"Data's read tasks (the job would hang); use fewer --workers or a smaller --cpus-per-worker")
    return workers, cpus, max(1, round(cpus))


def run_batch(opts: BatchOptions, *, log: Callable[[str], None] = print) -> BatchSummary:
    from ferry.runtime import open_model
    from ferry.runtime.engines import CHOICES

    if opts.provider not in CHOICES:
        raise FerryError(f"unknown provider {opts.provider!r}; choose one of {', '.join(CHOICES)}")
    for name, value, low in (("--batch-size", opts.batch_size, 1), ("--top-k", opts.top_k, 1), ("--workers", opts.workers, 0)):
        if value < low:
            raise FerryError(f"{name} must be >= {low} (got {value})")
    if opts.cpus_per_worker < 0 or opts.gpus_per_worker < 0:
        raise FerryError("--cpus-per-worker and --gpus-per-worker must be >= 0")
    model_path = Path(opts.model)
    if opts.min_score is not None and not 0 <= opts.min_score <= 1:
        raise FerryError(f"--min-score must be in [0, 1] (got {opts.min_score})")
    probe = open_model(model_path, provider="cpu", threads=1)  # a bad or stale model fails here, before Ray
    provider = opts.provider if opts.provider != "auto" or not opts.gpus_per_worker else "cuda"
    items = [p if _is_uri(p) else os.path.abspath(p) for p in resolve_inputs(opts.input)]
    if not items:
        raise FerryError(f"no input files in {opts.input}")
    if len(set(items)) != len(items):
        raise FerryError(f"{opts.input} lists {len(items) - len(set(items))} path(s) more than once; each image once, please")
    missing = [p for p in items if not _is_uri(p) and not Path(p).is_file()]
    present = [p for p in items if p not in set(missing)]
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FerryError(f"--out {out} exists and is not an empty folder (results are never written over)")

    import ray

    from ferry.cluster import start_ray

    started, ray_seconds = start_ray(opts.address, object_store_mb=opts.object_store_mb)
    try:
        resources = ray.cluster_resources()
        workers, cpus, threads = plan_workers(opts, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
        log(f"ferry batch: {len(items)} inputs, model {probe.name}, {workers} workers x {cpus:g} CPU"
            + (f" x {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else "") + f", {threads} thread(s) each, "
            f"batch {opts.batch_size}; Ray {'started' if started else 'joined'} in {ray_seconds:.1f} s")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
        t0 = time.perf_counter()
        try:
            if present:
                _run_dataset(ray, opts, present, tmp, workers=workers, cpus=cpus, threads=threads, provider=provider)
            if missing:
                _write_missing(missing, tmp / "missing-inputs.parquet", task=probe.task)
            table = _verify(tmp, items)
            seconds = time.perf_counter() - t0
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if started:
            ray.shutdown()
    failures = sum(e is not None for e in table.column("error").to_pylist())
    providers = sorted({p for p in table.column("provider").to_pylist() if p})
    return BatchSummary(len(items), failures, seconds, ray_seconds, str(out), workers, cpus, threads, providers)


def _run_dataset(ray, opts: BatchOptions, paths: list[str], tmp: Path, *, workers: int, cpus: float, threads: int,
                 provider: str) -> None:
    import ray.data

    from ferry.cluster import quiet_ray_data

    quiet_ray_data()  # after ray.data's import, which sets up its own loggers
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    # one read batch of files per block, a batch about READ_BATCH_BYTES: small files in batches of
    # up to a thousand (a task per few files costs more in Ray than the reading), big ones in fewer
    # (and at least four blocks a worker, or the workers wait: a read batch is one block downstream)
    rows = min(read_batch_rows(paths, opts.batch_size), math.ceil(len(paths) / (4 * workers)))
    blocks = min(math.ceil(len(paths) / rows), 2000)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    ds = ds.map_batches(read_files, batch_size=rows, num_cpus=READ_CPUS)
    model = str(Path(opts.model).resolve()) if not opts.address else ray.put(Path(opts.model).read_bytes())
    ds = ds.map_batches(
        PredictBatch,
        fn_constructor_kwargs={"model": model, "model_name": Path(opts.model).name, "provider": provider,
                               "threads": threads, "top_k": opts.top_k, "throttle_ms": opts.throttle_ms,
                               "min_score": opts.min_score},
        batch_size=opts.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=opts.gpus_per_worker or None,
    )
    ds.write_parquet(str(tmp))


def _schema():
    import pyarrow as pa

    cand = pa.struct([("index", pa.int64()), ("label", pa.string()), ("probability", pa.float64())])
    return pa.schema([("path", pa.string()), ("index", pa.int64()), ("label", pa.string()), ("probability", pa.float64()),
                      ("top_k", pa.list_(cand)), ("provider", pa.string()), ("error", pa.string())])


def _write_missing(paths: list[str], target: Path, task: str = "classify") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if task == "detect":
        from ferry.batch.detect import detection_schema, missing_rows

        pq.write_table(pa.table(missing_rows(paths), schema=detection_schema()), target)
        return

    n = len(paths)
    table = pa.table({"path": paths, "index": [None] * n, "label": [None] * n, "probability": [None] * n,
                      "top_k": [[] for _ in paths], "provider": [None] * n,
                      "error": [f"{p}: no such file" for p in paths]}, schema=_schema())
    pq.write_table(table, target)


def _verify(folder: Path, expected: list[str]):
    """Every input path exactly once in the output, or a FerryError (nothing lost, nothing doubled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f).select(["path", "error", "provider"]) for f in files]) if files else None
    got = table.column("path").to_pylist() if table is not None else []
    counts: dict[str, int] = {}
    for p in got:
        counts[p] = counts.get(p, 0) + 1
    doubled = sorted(p for p, c in counts.items() if c > 1)
    lost = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    if doubled or lost or extra:
        raise FerryError(f"batch output is inconsistent: {len(lost)} input(s) lost, {len(doubled)} doubled, {len(extra)} "
                         f"unexpected (e.g. {(lost + doubled + extra)[0]}); nothing was written to --out")
    return table
