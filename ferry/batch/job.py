"""`run_batch(options)`: batch inference on Ray Data, from a local folder to a cluster with object storage.

Inputs and `--out` are local paths or URIs (`ferry.batch.storage`: pyarrow's filesystems). The inputs
are cut, in order, into parts of a fixed size; a part is the unit of work and of output:

- a read task fetches a part's files (threads, for a store's latency), an actor holding one runtime
  `Classifier` predicts them (the runtime's own decoding and preprocessing, as `ferry predict`), and
  the same actor writes the part's rows straight to `--out` as `part-NNNNNN.parquet`: one row per
  input (path, index, label, probability, top_k, provider, error), a bad input a row with its error.
  A part's file appears whole or not at all (an object store's upload, or a rename), and a part done
  twice (a killed actor's retry) is the same file written again. The driver gets a few numbers a
  part back, never rows, and never needs to see a worker's disk.
- Commit is explicit: once every part's file is there and its footer checks out (its job, its
  inputs' digest, its row count), the driver writes `_SUCCESS.json` (the files, their row and error
  counts, the model's sha256, the inputs' count and digest) last. Readers trust only output listed
  there (`read_results`).
- A worker process that dies has its work redone a few times, not without end (Ray Data's default):
  a part whose worker dies on every attempt (an input that crashes the decoder) fails the job with
  the part and its inputs named (`PartTracker`); `--resume` finishes the rest.
- `_ferry_job.json`, written first, names the job (model sha256, inputs digest, top-k, part size):
  `--resume` after a crash skips the parts already complete and does the rest; an `--out` that holds
  another job's output is refused.

Everything that can be checked without Ray is checked before Ray starts: the options, the model, the
inputs' listing, the store's bucket and credentials, `--out`'s contents (and that it can be written).
Without an address a local Ray is started with bounded memory and no dashboard, and shut down at the
end; with `address` ("auto", "HOST:PORT" or "ray://HOST:PORT") the job joins a cluster.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.batch.storage import (
    OBJECT_STORES,
    FileSystems,
    NotAFile,
    TooLarge,
    check_bucket,
    check_size,
    filesystem,
    first_line,
    is_uri,
    read_bytes,
    reason,
    scheme,
    storage_endpoint,
    write_bytes,
)
from ferry.core.errors import FerryError

READ_CPUS = 0.25  # Ray Data's read tasks only move bytes: a small reservation keeps them from being starved
LIST_SUFFIXES = (".txt", ".lst", ".list")
READ_BATCH_BYTES = 32 * 2**20  # bytes of files a part aims at (a part's bytes cross the object store at once)
PARTS_TARGET = 64  # a job is cut into about this many parts, unless its part size hits a bound
READ_THREADS = 16  # concurrent reads of one part's files from an object store
# Ray Data's defaults retry a task and restart an actor without end: an input that crashes its worker
# process every time (a decoder's segfault) had the job loop forever. A few are enough to survive a
# killed worker or a lost node; past them the job fails and names the part (`PartTracker`).
TASK_RETRIES = 3  # re-runs of a read or decode task whose process died
ACTOR_RESTARTS = -1  # restarts of a predicting actor whose process died: counted over the actor's life, so
# not bounded (a long job's actors may die now and then: out-of-memory kills, preempted nodes); the
# loop on one part is bounded by its retries:
ACTOR_TASK_RETRIES = 3  # re-runs of a part on its restarted actor
JOB_FILE = "_ferry_job.json"
SUCCESS_FILE = "_SUCCESS.json"
PART_META_KEY = b"ferry.batch"
JOB_SCHEMA = "ferry.batch-job/1"
SUCCESS_SCHEMA = "ferry.batch-success/1"


@dataclass
class BatchOptions:
    """One batch job. Zero means "choose for this machine or cluster" (docs: "Batch inference")."""

    model: str
    input: str  # a folder, a glob, a text file listing paths/URIs, or a URI (a prefix or one object)
    out: str  # output folder or URI prefix: part-NNNNNN.parquet files and _SUCCESS.json
    address: str | None = None  # None: a local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT": a cluster
    workers: int = 0  # actors in the pool (0: one per CPU locally, or per GPU with gpus_per_worker)
    cpus_per_worker: float = 0.0  # CPUs each actor reserves (0: share the CPUs left after reading)
    gpus_per_worker: float = 0.0  # GPUs each actor reserves (> 0 selects the CUDA provider)
    batch_size: int = 32
    top_k: int = 5
    provider: str = "auto"
    object_store_mb: int = 256  # local Ray only: the object store's size
    resume: bool = False  # finish an earlier run of the same job on the same `out` (its complete parts are kept)
    storage_endpoint: str | None = None  # an S3-compatible store's URL (None: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS)
    part_rows: int = 0  # inputs per part file (0: chosen from the inputs; a resumed job keeps its first run's)
    throttle_ms: int = 0  # sleep per inference batch in each actor: only to make a test job last long enough to kill
    decode_stage: bool | None = None  # decode and preprocess in CPU tasks ahead of the actors (None: on with GPUs)
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    min_score: float | None = None  # detectors: detections scoring at least this (None: the runtime's 0.5)


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
    parts: int = 0
    resumed_parts: int = 0  # parts found complete from an earlier run and kept

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def describe(self) -> str:
        if self.workers == 0:  # every part was there: nothing ran
            return (f"{self.images} images, {self.failures} failed; {self.resumed_parts} of {self.parts} parts kept from an "
                    f"earlier run, nothing left to predict; results committed in {self.out} ({SUCCESS_FILE})")
        kept = f", {self.resumed_parts} of {self.parts} parts kept from an earlier run" if self.resumed_parts else ""
        return (f"{self.images} images, {self.failures} failed, {self.images_per_second:.1f} images/s "
                f"({self.seconds:.1f} s; starting Ray took {self.ray_start_seconds:.1f} s){kept}; {self.workers} workers x "
                f"{self.cpus_per_worker:g} CPU, {self.threads_per_worker} onnxruntime thread(s) each, provider "
                f"{', '.join(self.providers) or '-'}; results committed in {self.out} ({SUCCESS_FILE})")


# --- inputs ------------------------------------------------------------------------------------


def resolve_inputs(spec: str, endpoint: str | None = None) -> list[str]:
    """A folder (its files, recursively, sorted, hidden ones skipped), a glob, a text file listing
    paths or URIs (one per line, '#' comments; relative entries are relative to the list's folder or
    prefix), a single file, or a URI: a prefix (its objects, recursively, sorted) or one object."""
    from ferry.runtime.inputs import expand_inputs

    if is_uri(spec):
        return _list_uri(spec, endpoint)
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FerryError(f"cannot read the list {spec}: {reason(exc)}") from exc
        except UnicodeDecodeError as exc:
            raise FerryError(f"the list {spec} is not UTF-8 text (byte {exc.start}): one path or URI a line") from exc
        return _list_entries(text, str(path.parent))
    if path.exists():
        return expand_inputs([spec])
    if any(ch in spec for ch in "*?["):
        return sorted(str(p) for p in map(Path, globlib.glob(spec, recursive=True)) if p.is_file())
    raise FerryError(f"input {spec} does not exist (give a folder, a glob, a text file listing paths, or a URI)")


def _list_entries(text: str, base: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    items = [ln for ln in lines if ln and not ln.startswith("#")]
    if is_uri(base):
        return [i if is_uri(i) else f"{base.rstrip('/')}/{i}" for i in items]
    return [i if is_uri(i) else str(Path(i) if Path(i).is_absolute() else (Path(base) / i)) for i in items]


def _list_uri(uri: str, endpoint: str | None) -> list[str]:
    """A URI of one object -> [uri] (or its entries, for a list file); of a prefix -> its objects' URIs,
    recursively, sorted, hidden names skipped."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(uri, endpoint)
    check_bucket(fs, uri, inner, "input", endpoint)
    try:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            if Path(inner).suffix.lower() in LIST_SUFFIXES:
                return _list_entries(read_bytes(fs, inner).decode("utf-8"), uri.rsplit("/", 1)[0])
            return [uri]
        if info.type != pafs.FileType.Directory:
            raise FerryError(f"input {uri} does not exist")
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
    except OSError as exc:
        raise FerryError(f"cannot list input {uri}: {reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise FerryError(f"the list {uri} is not UTF-8 text (byte {exc.start}): one path or URI a line") from exc
    base, root = uri.rstrip("/"), inner.rstrip("/")
    rel = [f[len(root):].lstrip("/") for f in files]
    return sorted(f"{base}/{r}" for r in rel if not any(part.startswith(".") for part in r.split("/")))


def max_input_bytes() -> int:
    """Files larger than this are no image the runtime decodes (4 bytes a pixel at Pillow's
    decompression-bomb limit, and a MiB for headers): their rows say so, unread. A job that read
    a stray video or archive whole could run its worker out of memory, again on every retry."""
    from ferry.runtime.images import max_pixels

    return 4 * max_pixels() + 2**20


def read_files(batch: dict[str, Any], endpoint: str | None = None, filesystems: FileSystems | None = None) -> dict[str, list]:
    """Rows of paths -> rows of (path, bytes, read_error: "" when read): plain file reads, or pyarrow's
    filesystem for a URI's scheme (s3://, gs://, hdfs://, ...), URIs read by a few threads at once
    (a store's latency, not its bandwidth, bounds small objects). A file that cannot be read (missing,
    no permission) is a row with its error, not a failed job.

    Why not `ray.data.read_binary_files`: its own per-file machinery costs more than reading a small
    file (docs: "Batch inference"; Ray's own issue #37499 reports the same for read_images)."""
    paths = [str(p) for p in batch["path"]]
    filesystems = filesystems or FileSystems(endpoint)
    from ferry.runtime.images import NOT_A_FILE

    limit = max_input_bytes()

    def one(p: str) -> tuple[bytes, str]:
        try:
            if is_uri(p):
                return filesystems.read(p, limit), ""
            st = os.stat(p)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(p)
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO to read would wait for a writer
                raise NotAFile(NOT_A_FILE)
            check_size(st.st_size, limit)
            with open(p, "rb") as fh:
                return fh.read(), ""
        except Exception as exc:  # noqa: BLE001 - one unreadable file is one row's error
            why = reason(exc)
            plain = why in ("no such file", "permission denied", "is a folder") or isinstance(exc, (TooLarge, NotAFile))
            return b"", f"{p}: {why}" if plain else f"{p}: cannot read: {why}"

    if any(is_uri(p) for p in paths) and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(paths))) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    return {"path": paths, "bytes": [r[0] for r in results], "read_error": [r[1] for r in results]}


def read_batch_rows(paths: list[str], floor: int) -> int:
    """Files per read batch: about READ_BATCH_BYTES of them (sizes from a sample of up to 100 local
    files), at least `floor` (the inference batch) and at most 1024; 256 when nothing is local."""
    sample = [p for p in paths[:: max(1, len(paths) // 100)][:100] if not is_uri(p)]
    sizes = [os.path.getsize(p) for p in sample if os.path.isfile(p)]
    if not sizes:
        return max(floor, 256)
    return int(min(1024, max(floor, READ_BATCH_BYTES // max(1, sum(sizes) // len(sizes)))))


def choose_part_rows(paths: list[str], batch_size: int) -> int:
    """Inputs per part: about PARTS_TARGET parts a job (resume loses at most a part's work per
    worker), at least one inference batch, at most a read batch's bytes (`read_batch_rows`)."""
    return max(1, min(read_batch_rows(paths, batch_size), max(batch_size, math.ceil(len(paths) / PARTS_TARGET))))


def _inside(items: list[str], out: str) -> list[str]:
    """The inputs inside the folder or prefix `out` (local paths absolute, as `items` are)."""
    root = (out if is_uri(out) else os.path.abspath(out)).rstrip("/") + "/"
    return [p for p in items if p.startswith(root)]


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a file name of other bytes, decoded with surrogate escapes
        return False
    return True


def _digest(paths: list[str]) -> str:
    """sha256 of the paths in order, each ended by a newline; a list where a path holds a newline
    is hashed with each path's length before it instead, so that ["a\nb"] and ["a", "b"] differ
    (lists without one keep the digest that jobs written before recorded)."""
    h = hashlib.sha256()
    framed = any("\n" in p for p in paths)
    if framed:
        h.update(b"\0framed\n")  # no path starts with NUL: no unframed list hashes these bytes
    for p in paths:
        b = p.encode("utf-8")
        h.update(b"%d:" % len(b) + b if framed else b + b"\n")
    return h.hexdigest()


def part_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


# --- the job's record in --out -------------------------------------------------------------------


@dataclass
class Destination:
    """`--out` as seen by the driver: its filesystem, its path inside it, and what it holds."""

    location: str  # as given (a URI), or the absolute local path
    endpoint: str | None
    fs: Any
    root: str
    job: dict | None = None  # _ferry_job.json, when there
    committed: dict | None = None  # _SUCCESS.json, when there
    parts: dict[int, str] = field(default_factory=dict)  # part files present: part -> path

    @property
    def in_place(self) -> bool:
        return scheme(self.location) in OBJECT_STORES

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"


def open_destination(out: str, endpoint: str | None) -> Destination:
    """Reach `--out` and read what it holds; a FerryError for a missing bucket, refused credentials,
    a file, or a folder holding anything but a ferry batch job's files."""
    import pyarrow.fs as pafs

    fs, root = filesystem(out, endpoint)
    location = out if is_uri(out) else root
    check_bucket(fs, out, root, "--out", endpoint)
    dest = Destination(location, endpoint, fs, root.rstrip("/") or root)
    try:
        info = fs.get_file_info(dest.root)
        if info.type == pafs.FileType.File:
            raise FerryError(f"--out {out} is a file; give a folder or a URI prefix for the results")
        entries = fs.get_file_info(pafs.FileSelector(dest.root, recursive=False)) if info.type == pafs.FileType.Directory else []
        foreign = []
        for e in entries:
            name = e.path.rsplit("/", 1)[-1]
            if name == JOB_FILE:
                dest.job = json.loads(read_bytes(fs, e.path))
            elif name == SUCCESS_FILE:
                dest.committed = json.loads(read_bytes(fs, e.path))
            elif name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit() and e.type == pafs.FileType.File:
                dest.parts[int(name[5:-8])] = e.path
            elif not (name.startswith(".") and name.endswith(".tmp")):  # a killed writer's temporary file is ignored
                foreign.append(name)
    except OSError as exc:
        raise FerryError(f"cannot read --out {out}: {reason(exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise FerryError(f"--out {out} holds a damaged {JOB_FILE} or {SUCCESS_FILE} ({first_line(exc)}); "
                         f"results are never written over: choose another --out") from exc
    if foreign or ((dest.parts or dest.committed) and not dest.job):
        example = (foreign or sorted(part_name(p) for p in dest.parts) or [SUCCESS_FILE])[0]
        raise FerryError(f"--out {out} holds files that are not this job's (e.g. {example}); results are never "
                         f"written over: give a new or empty folder or prefix")
    return dest


def _job_record(opts: BatchOptions, model_sha256: str, model_name: str, items: list[str], part_rows: int) -> dict:
    record = {"schema": JOB_SCHEMA, "model": {"name": model_name, "file": Path(opts.model).name, "sha256": model_sha256},
              "inputs": {"spec": opts.input, "count": len(items), "sha256": _digest(items)}, "top_k": opts.top_k,
              "min_score": opts.min_score, "part_rows": part_rows, "parts": math.ceil(len(items) / part_rows)}
    key = json.dumps([model_sha256, record["inputs"]["sha256"], opts.top_k, part_rows]
                     + ([opts.min_score] if opts.min_score is not None else [])).encode()
    record["job"] = hashlib.sha256(key).hexdigest()[:16]
    return record


def _differs(old: dict, model_sha256: str, items_sha256: str, count: int, top_k: int,
             min_score: float | None = None) -> str | None:
    """Why an earlier job's record names another job than this one, or None."""
    try:
        if old.get("schema") != JOB_SCHEMA:
            return f"its {JOB_FILE} is not one this version of ferry writes"
        if old["model"]["sha256"] != model_sha256:
            return f"another model (sha256 {old['model']['sha256'][:12]}, {old['model'].get('file')})"
        if old["inputs"]["sha256"] != items_sha256:
            return f"other inputs ({old['inputs']['count']} listed then, {count} now)"
        if old["top_k"] != top_k:
            return f"another --top-k ({old['top_k']})"
        if old.get("min_score") != min_score:
            return f"another --min-score ({old.get('min_score')})"
        int(old["part_rows"]), int(old["parts"]), str(old["job"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"its {JOB_FILE} is damaged"
    return None


def read_part_footer(fs: Any, path: str) -> tuple[dict, int]:
    """(the part's ferry metadata, its row count) from a part file's Parquet footer."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        md = pq.read_metadata(f)
    return json.loads(md.metadata[PART_META_KEY]), md.num_rows


def _complete_parts(dest: Destination, job: dict, items: list[str], candidates: list[int]) -> dict[int, dict]:
    """The parts among `candidates` whose file in `dest` is complete: readable, this job's, this
    part's inputs (their digest), one row each. Others are to be (re)done."""
    rows = job["part_rows"]

    def check(part: int) -> dict | None:
        try:
            meta, n = read_part_footer(dest.fs, dest.path(part_name(part)))
        except Exception:  # noqa: BLE001 - unreadable (cut short, damaged): not complete
            return None
        paths = items[part * rows:(part + 1) * rows]
        if meta.get("job") != job["job"] or meta.get("part") != part or n != len(paths) or meta.get("paths_sha256") != _digest(paths):
            return None
        return {**meta, "rows": n}

    with ThreadPoolExecutor(max_workers=READ_THREADS if dest.in_place else 4) as pool:
        found = dict(zip(candidates, pool.map(check, candidates)))
    return {p: m for p, m in found.items() if m is not None}


def _commit(dest: Destination, job: dict, done: dict[int, dict], seconds: float) -> dict:
    files = [{"name": part_name(p), "rows": m["rows"], "errors": m["errors"]} for p, m in sorted(done.items())]
    manifest = {"schema": SUCCESS_SCHEMA, "job": job["job"], "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": job["model"], "inputs": job["inputs"], "top_k": job["top_k"],
                "rows": sum(f["rows"] for f in files), "errors": sum(f["errors"] for f in files),
                "providers": sorted({m.get("provider") for m in done.values() if m.get("provider")}),
                "seconds": round(seconds, 3), "files": files}
    try:
        write_bytes(dest.fs, dest.path(SUCCESS_FILE), (json.dumps(manifest, indent=2) + "\n").encode(), in_place=dest.in_place)
    except OSError as exc:
        raise FerryError(f"cannot commit {dest.location}: {reason(exc)}; every part file is written: run again with "
                         f"--resume to commit them") from exc
    if not dest.in_place:  # temporary files of writers killed mid-write: tidying, the commit is done
        import pyarrow.fs as pafs

        try:
            for e in dest.fs.get_file_info(pafs.FileSelector(dest.root)):
                name = e.path.rsplit("/", 1)[-1]
                if name.startswith(".part-") and name.endswith(".tmp"):
                    dest.fs.delete_file(e.path)
        except OSError:
            pass  # hidden names: readers and --resume never take them
    return manifest


def read_results(out: str, endpoint: str | None = None):
    """The committed results of a job as one pyarrow Table: only the files its `_SUCCESS.json`
    lists (a FerryError when there is none: the job has not finished), each checked to be that
    job's part of that number with the rows the manifest says (a file written over since, by
    another job on the same --out, is an error, not rows of another model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    endpoint = storage_endpoint(endpoint)
    fs, root = filesystem(out, endpoint)
    root = root.rstrip("/") or root
    try:
        manifest = json.loads(read_bytes(fs, f"{root}/{SUCCESS_FILE}"))
    except FileNotFoundError as exc:
        raise FerryError(f"{out} holds no committed results (no {SUCCESS_FILE}): the job has not finished; "
                         f"run it again with --resume") from exc
    tables = [pq.read_table(f"{root}/{f['name']}", filesystem=fs) for f in manifest["files"]]
    for f, t in zip(manifest["files"], tables):
        meta = json.loads((t.schema.metadata or {}).get(PART_META_KEY, b"{}"))
        if (meta.get("job"), meta.get("part"), t.num_rows) != (manifest["job"], int(f["name"][5:-8]), f["rows"]):
            raise FerryError(f"{out}: {f['name']} is not the part {SUCCESS_FILE} committed (another job's, or written "
                             f"over since): these results cannot be trusted; run the job again into a new --out")
    table = pa.concat_tables(tables) if tables else _schema().empty_table()
    if table.num_rows != manifest["rows"]:
        raise FerryError(f"{out}: {table.num_rows} rows in the listed files, {manifest['rows']} in {SUCCESS_FILE}")
    return table


# --- the actor -----------------------------------------------------------------------------------


def read_part(batch, endpoint: str | None = None):
    """Ray Data stage: rows of (part, paths) -> rows of (part, paths, data, read_error), each part's
    files read at once (`read_files`)."""
    import pyarrow as pa

    out: dict[str, list] = {"part": [], "paths": [], "data": [], "read_error": []}
    filesystems = FileSystems(endpoint)
    for part, paths in zip(batch.column("part").to_pylist(), batch.column("paths").to_pylist()):
        got = read_files({"path": paths}, filesystems=filesystems)
        out["part"].append(part)
        out["paths"].append(paths)
        out["data"].append(got["bytes"])
        out["read_error"].append(got["read_error"])
    return pa.table(out, schema=pa.schema([("part", pa.int64()), ("paths", pa.list_(pa.string())),
                                           ("data", pa.large_list(pa.large_binary())), ("read_error", pa.list_(pa.string()))]))


def prepare_part(batch, preprocess: dict | None = None, tracker=None):
    """Ray Data stage (the decode stage of GPU jobs): each part's images decoded and preprocessed on a
    CPU worker, with the runtime's own code, into float32 tensors of the model's input shape (bytes
    of C-order arrays), so the GPU actors only infer. An image that cannot be used keeps its error.
    `tracker`: a PartTracker, told of each part begun and finished."""
    import numpy as np
    import pyarrow as pa

    from ferry.runtime.images import decode_image
    from ferry.runtime.presets import Preprocess
    from ferry.runtime.presets import preprocess as prepare

    spec = Preprocess.from_dict(preprocess)
    out: dict[str, list] = {"part": [], "paths": [], "data": [], "read_error": []}
    for row in batch.to_pylist():
        _track(tracker, "begin", "decode", row["part"])
        tensors, errors = [], []
        for path, data, error in zip(row["paths"], row["data"], row["read_error"]):
            if error:
                tensors.append(b"")
                errors.append(error)
                continue
            try:
                tensors.append(np.ascontiguousarray(prepare(decode_image(data, path), spec), np.float32).tobytes())
                errors.append("")
            except FerryError as exc:
                tensors.append(b"")
                errors.append(_one_line(exc, path))
            except Exception as exc:  # noqa: BLE001 - one undecodable input must not stop the part
                tensors.append(b"")
                errors.append(f"{path}: {type(exc).__name__}: {exc}"[:300])
        out["part"].append(row["part"])
        out["paths"].append(row["paths"])
        out["data"].append(tensors)
        out["read_error"].append(errors)
        _track(tracker, "finish", "decode", row["part"])
    return pa.table(out, schema=pa.schema([("part", pa.int64()), ("paths", pa.list_(pa.string())),
                                           ("data", pa.large_list(pa.large_binary())), ("read_error", pa.list_(pa.string()))]))


def _part_tracker_class():
    import ray

    @ray.remote(num_cpus=0)
    class PartTracker:
        """How often each stage ("decode", "predict") began each part, and which it finished: a part
        begun again and again and never finished is one whose worker process died on it each time."""

        def __init__(self) -> None:
            self.begun: dict[tuple[str, int], int] = {}
            self.finished: set[tuple[str, int]] = set()

        def begin(self, stage: str, part: int) -> None:
            self.begun[stage, part] = self.begun.get((stage, part), 0) + 1

        def finish(self, stage: str, part: int) -> None:
            self.finished.add((stage, part))

        def crashed(self) -> list[tuple[int, str, int]]:
            """(attempts, stage, part) of the parts begun more than once and never finished, most first."""
            return sorted(((n, stage, part) for (stage, part), n in self.begun.items()
                           if n > 1 and (stage, part) not in self.finished), key=lambda t: (-t[0], t[2]))

    return PartTracker


def _track(tracker, what: str, stage: str, part: int) -> None:
    """Tell the job's PartTracker (None: none) that `stage` began or finished `part`; a begin is waited
    for, so that it is on record before the work that may crash the process. Best effort: a tracker
    that cannot be reached (gone with the driver's node) costs the failure message its part's name,
    never the job."""
    if tracker is None:
        return
    import ray

    try:
        ref = getattr(tracker, what).remote(stage, part)
        if what == "begin":
            ray.get(ref, timeout=30)
    except Exception:  # noqa: BLE001 - any failure to reach it: the work goes on
        pass


def _one_line(exc: Exception, source: str) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg if msg.startswith(source) else f"{source}: {msg}"


class PredictPart:
    """One Classifier per actor; `__call__` predicts whole parts and writes each part's file to `out`,
    returning a row of counts per part."""

    def __init__(self, model: str | Any, model_name: str, provider: str, threads: int, top_k: int, batch_size: int,
                 out: str, endpoint: str | None, job: str, throttle_ms: int = 0, prepared: bool = False,
                 min_score: float | None = None, tracker=None):
        """`model`: a path every node can read (a local job), or an ObjectRef of the model's bytes
        (a cluster job: the model travels once through the object store). `tracker`: a PartTracker."""
        import ray

        from ferry.runtime import open_model

        if isinstance(model, str):
            self.clf = open_model(Path(model), provider=provider, threads=threads)  # a Classifier or a Detector
        else:  # the engine holds the model once loaded: the temporary copy goes at once
            folder = Path(tempfile.mkdtemp(prefix="ferry-batch-"))
            try:
                (folder / model_name).write_bytes(ray.get(model))
                self.clf = open_model(folder / model_name, provider=provider, threads=threads)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.top_k, self.batch_size, self.throttle, self.min_score = top_k, batch_size, throttle_ms / 1000.0, min_score
        self.fs, root = filesystem(out, endpoint)
        self.root = root.rstrip("/") or root
        self.in_place = scheme(out) in OBJECT_STORES
        self.job = job
        self.node = ray.get_runtime_context().get_node_id()
        self.prepared = prepared  # the decode stage sent tensors, not encoded images
        self.tracker = tracker

    def predict(self, paths: list[str], data: list[bytes], read_errors: list[str]):
        """Result rows for one part's inputs, in order, through the runtime's own `predict_many`."""
        import pyarrow as pa

        if self.clf.task == "detect":  # a detector's rows: ferry/batch/detect.py
            from ferry.batch.detect import detection_rows, detection_schema

            out: dict[str, list] = {}
            for start in range(0, len(paths), self.batch_size):
                end = start + self.batch_size
                rows = detection_rows(self.clf, paths[start:end], data[start:end], read_errors[start:end],
                                      min_score=self.min_score)
                for k, v in rows.items():
                    out.setdefault(k, []).extend(v)
                if self.throttle:
                    time.sleep(self.throttle)
            return pa.Table.from_pydict(out, schema=detection_schema())
        readable = [i for i, e in enumerate(read_errors) if not e]
        outcomes: dict[int, Any] = {}
        for start in range(0, len(readable), self.batch_size):
            chunk = readable[start:start + self.batch_size]
            if self.prepared:  # tensors from the decode stage: straight to the engine
                import numpy as np

                shape = self.clf.spec.input_shape
                x = np.stack([np.frombuffer(data[i], np.float32).reshape(shape) for i in chunk])
                outcomes.update(zip(chunk, self.clf.outcomes(self.clf.infer(x), [paths[i] for i in chunk], self.top_k)))
            else:
                outcomes.update(zip(chunk, self.clf.predict_many([data[i] for i in chunk], names=[paths[i] for i in chunk],
                                                                 top_k=self.top_k, batch_size=len(chunk))))
            if self.throttle:
                time.sleep(self.throttle)
        out = {k: [] for k in ("path", "index", "label", "probability", "top_k", "provider", "error")}
        for i, path in enumerate(paths):
            o = outcomes.get(i)
            p = o.prediction if o else None
            out["path"].append(path)
            out["index"].append(p.index if p else None)
            out["label"].append(p.label if p else None)
            out["probability"].append(p.probability if p else None)
            out["top_k"].append([c.to_dict() for c in p.top_k] if p else [])
            out["provider"].append(self.clf.provider.used)
            out["error"].append(o.error if o else read_errors[i])
        return pa.Table.from_pydict(out, schema=_schema())  # one schema for every file, null columns included

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        done: dict[str, list] = {"part": [], "rows": [], "errors": [], "node": []}
        for row in batch.to_pylist():
            _track(self.tracker, "begin", "predict", row["part"])
            table = self.predict(row["paths"], row["data"], row["read_error"])
            written = table.column("path").to_pylist()
            meta = {"job": self.job, "part": row["part"], "rows": table.num_rows,
                    "errors": table.num_rows - table.column("error").null_count, "paths_sha256": _digest(written),
                    "node": self.node, "provider": self.clf.provider.used}
            sink = pa.BufferOutputStream()
            pq.write_table(table.replace_schema_metadata({PART_META_KEY: json.dumps(meta).encode()}), sink)
            write_bytes(self.fs, f"{self.root}/{part_name(row['part'])}", sink.getvalue().to_pybytes(), in_place=self.in_place)
            _track(self.tracker, "finish", "predict", row["part"])
            for k in done:
                done[k].append(meta[k])
        return pa.table(done, schema=pa.schema([("part", pa.int64()), ("rows", pa.int64()), ("errors", pa.int64()),
                                                ("node", pa.string())]))


def _schema():
    import pyarrow as pa

    cand = pa.struct([("index", pa.int64()), ("label", pa.string()), ("probability", pa.float64())])
    return pa.schema([("path", pa.string()), ("index", pa.int64()), ("label", pa.string()), ("probability", pa.float64()),
                      ("top_k", pa.list_(cand)), ("provider", pa.string()), ("error", pa.string())])


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


def _check_options(opts: BatchOptions) -> None:
    from ferry.runtime.engines import CHOICES

    if opts.provider not in CHOICES:
        raise FerryError(f"unknown provider {opts.provider!r}; choose one of {', '.join(CHOICES)}")
    if opts.min_score is not None and not 0 <= opts.min_score <= 1:
        raise FerryError(f"--min-score must be in [0, 1] (got {opts.min_score})")
    for name, value, low in (("--batch-size", opts.batch_size, 1), ("--top-k", opts.top_k, 1), ("--workers", opts.workers, 0),
                             ("part_rows", opts.part_rows, 0)):
        if value < low:
            raise FerryError(f"{name} must be >= {low} (got {value})")
    for name, value in (("--cpus-per-worker", opts.cpus_per_worker), ("--gpus-per-worker", opts.gpus_per_worker),
                        ("decode_cpus", opts.decode_cpus)):
        if not (math.isfinite(value) and value >= 0):
            raise FerryError(f"{name} must be a number >= 0 (got {value})")
    if not opts.address and opts.object_store_mb < 80:
        raise FerryError(f"--object-store-mb must be >= 80 (Ray's minimum is 75 MiB; got {opts.object_store_mb})")


def run_batch(opts: BatchOptions, *, log: Callable[[str], None] = print) -> BatchSummary:
    from ferry.core.fileio import sha256_file
    from ferry.runtime import open_model

    # --- before Ray: everything that can be checked here is ---
    _check_options(opts)
    model_path = Path(opts.model)
    probe = open_model(model_path, provider="cpu", threads=1)  # a bad or stale model fails here
    if opts.min_score is not None and probe.task != "detect":
        raise FerryError(f"--min-score applies to detectors; {opts.model} is a {probe.task} model (use --top-k)")
    if probe.task == "detect" and opts.decode_stage:
        raise FerryError("the decode stage runs classifiers only: a detector decodes in its actors (drop decode_stage)")
    model_sha256 = sha256_file(model_path)
    provider = opts.provider if opts.provider != "auto" or not opts.gpus_per_worker else "cuda"
    if not opts.address:  # the workers are on this machine: an engine that cannot run here is the whole error
        if provider in ("cuda", "tensorrt"):
            from ferry.runtime.providers import check_gpu_build

            check_gpu_build(provider)  # no session on the driver: no device context, no TensorRT engine built twice
        elif provider in ("openvino", "openvino-bf16"):
            open_model(model_path, provider=provider, threads=1)
    endpoint = storage_endpoint(opts.storage_endpoint)
    items = [p if is_uri(p) else os.path.abspath(p) for p in resolve_inputs(opts.input, endpoint)]
    unnamed = [p for p in items if not _utf8(p)]
    if unnamed:  # a result row names its input in Parquet's UTF-8 text: such a name cannot be a row
        shown = unnamed[0].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise FerryError(f"{len(unnamed)} input name(s) are not valid UTF-8 (e.g. {shown}): results name their inputs "
                         "in UTF-8 text; rename them (for example with convmv) and run again")
    inside = _inside(items, opts.out)
    if inside:  # --out in the inputs' folder: its own files are results, not images (and a resume lists the same inputs)
        log(f"ferry batch: {len(inside)} file(s) inside --out {opts.out} are not inputs (e.g. {inside[0]})")
        skip = set(inside)
        items = [p for p in items if p not in skip]
    if not items:
        raise FerryError(f"no input files in {opts.input}")
    if len(set(items)) != len(items):
        raise FerryError(f"{opts.input} lists {len(items) - len(set(items))} path(s) more than once; each image once, please")
    if opts.address:  # before --out is claimed: a cluster that is not there is the whole error
        from ferry.cluster import check_reachable

        check_reachable(opts.address)
    dest = open_destination(opts.out, endpoint)
    items_sha256 = _digest(items)
    if dest.job is not None:
        why = _differs(dest.job, model_sha256, items_sha256, len(items), opts.top_k, opts.min_score)
        if why:
            raise FerryError(f"--out {opts.out} holds another job's output ({why}); results are never written over: "
                             f"choose another --out")
        if dest.committed is not None and not opts.resume:
            raise FerryError(f"--out {opts.out} already holds this job's committed results ({SUCCESS_FILE}); "
                             f"choose another --out, or --resume to accept them")
        if dest.committed is None and dest.parts and not opts.resume:  # a record alone (Ray never ran) holds no work
            raise FerryError(f"--out {opts.out} holds an unfinished run of this job ({len(dest.parts)} of "
                             f"{dest.job['parts']} part files); add --resume to finish it, or choose another --out")
        job = dest.job
    else:
        part_rows = opts.part_rows or choose_part_rows(items, opts.batch_size)
        if _decodes_ahead(opts, probe.task) and not opts.part_rows:
            # decoded tensors are larger than the files: a part's tensors stay about a read batch's bytes
            tensor_bytes = 4 * math.prod(probe.spec.input_shape)
            part_rows = max(1, min(part_rows, max(opts.batch_size, READ_BATCH_BYTES // tensor_bytes)))
        job = _job_record(opts, model_sha256, probe.name, items, part_rows)
        try:
            if not dest.in_place:
                dest.fs.create_dir(dest.root, recursive=True)
            write_bytes(dest.fs, dest.path(JOB_FILE), (json.dumps(job, indent=2) + "\n").encode(), in_place=dest.in_place)
        except OSError as exc:
            raise FerryError(f"cannot write to --out {opts.out}: {reason(exc)}") from exc
    rows, parts = job["part_rows"], job["parts"]
    t0 = time.perf_counter()
    done = _complete_parts(dest, job, items, sorted(p for p in dest.parts if p < parts))
    kept = len(done)
    if dest.committed is not None and kept == parts:
        log(f"ferry batch: {opts.out} already holds this job's committed results; nothing to do")
        return _summary(dest.committed, dest, time.perf_counter() - t0, 0.0, (0, 0.0, 0), kept)
    todo = [p for p in range(parts) if p not in done]
    if dest.committed is not None:  # committed once, then a part went missing: no longer committed until redone
        try:
            dest.fs.delete_file(dest.path(SUCCESS_FILE))
        except OSError as exc:
            raise FerryError(f"cannot write to --out {opts.out}: {reason(exc)}") from exc

    started, ray_seconds, plan = False, 0.0, (0, 0.0, 0)
    if todo:
        import ray

        from ferry.cluster import start_ray

        started, ray_seconds = start_ray(opts.address, object_store_mb=opts.object_store_mb)
        try:
            resources = ray.cluster_resources()
            plan = plan_workers(opts, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
            plan = (min(plan[0], len(todo)), *plan[1:])  # an actor a part at most: no actor started for nothing
            log(f"ferry batch: {len(items)} inputs in {parts} parts of {rows}" + (f" ({kept} done earlier)" if kept else "")
                + f", model {probe.name}, {plan[0]} workers x {plan[1]:g} CPU"
                + (f" x {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else "") + f", {plan[2]} thread(s) each, "
                f"batch {opts.batch_size}; Ray {'joined' if opts.address or not started else 'started'} in {ray_seconds:.1f} s")
            t0 = time.perf_counter()
            _check_nodes_see(ray, dest, job["job"], items)
            _run_dataset(ray, opts, items, job, todo, dest, endpoint, plan=plan, provider=provider,
                         decode=_decodes_ahead(opts, probe.task))
        finally:
            if started:
                ray.shutdown()
    found = _complete_parts(dest, job, items, todo)
    missing = [p for p in todo if p not in found]
    if missing:
        raise FerryError(f"{len(missing)} part file(s) missing or incomplete in {opts.out} after the job (e.g. "
                         f"{part_name(missing[0])}); nothing was committed: run again with --resume")
    done.update(found)
    seconds = time.perf_counter() - t0
    manifest = _commit(dest, job, done, seconds)
    return _summary(manifest, dest, seconds, ray_seconds, plan, kept)


def _summary(manifest: dict, dest: Destination, seconds: float, ray_seconds: float, plan: tuple[int, float, int],
             kept: int) -> BatchSummary:
    return BatchSummary(manifest["rows"], manifest["errors"], seconds, ray_seconds, dest.location, plan[0], plan[1], plan[2],
                        list(manifest["providers"]), len(manifest["files"]), kept)


def _check_nodes_see(ray, dest: Destination, job: str, items: list[str]) -> None:
    """On a cluster of several nodes, every node must reach `--out` (a local folder only on a shared
    filesystem; an object store with the credentials in each node's environment), and local inputs:
    a FerryError now rather than results scattered over the nodes' own disks, or rows that say "no
    such file" for whatever a node without the driver's disk was given to read."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    sample = next((p for p in items[:100] if not is_uri(p) and os.path.isfile(p)), None)  # a local input the driver sees

    @ray.remote(num_cpus=0)
    def sees(location: str, endpoint: str | None, sample: str | None) -> tuple[str, str]:
        try:
            fs, root = filesystem(location, endpoint)
            record = json.loads(read_bytes(fs, f"{root.rstrip('/')}/{JOB_FILE}"))
            out = "" if record.get("job") == job else "another job's record"
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            out = reason(exc)
        return out, "" if sample is None or os.path.isfile(sample) else f"no {sample}"

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(dest.location, dest.endpoint,
                                                                                                   sample)
            for n in nodes]
    try:
        answers = ray.get(refs, timeout=300)
    except Exception as exc:  # noqa: BLE001 - a node that does not answer: one line, not Ray's traceback
        raise FerryError(f"cannot check that every node of the cluster reaches --out {dest.location}: "
                         f"{first_line(exc)}") from exc
    problems = [(n, why) for n, (why, _) in zip(nodes, answers) if why]
    if problems:
        node, why = problems[0]
        hint = ("a local folder works on a cluster only where it is a filesystem shared by every node; use an object "
                "store (s3://...)") if not is_uri(dest.location) else "each node needs the store's credentials in its environment"
        raise FerryError(f"--out {dest.location} cannot be read from {len(problems)} of {len(nodes)} nodes of the cluster "
                         f"(node {node[:12]}: {why}); {hint}")
    missing = [(n, why) for n, (_, why) in zip(nodes, answers) if why]
    if missing:
        node, why = missing[0]
        raise FerryError(f"the inputs are not on {len(missing)} of {len(nodes)} nodes of the cluster (node {node[:12]} has "
                         f"{why}): local inputs work on a cluster only where they are on a filesystem shared by every "
                         f"node; use an object store (s3://...)")


def _decodes_ahead(opts: BatchOptions, task: str) -> bool:
    """Whether a decode stage runs ahead of the actors: on for GPU jobs unless told; never for a
    detector (its rows need each image's own size, known in the actor that decodes it)."""
    if task == "detect":
        return False
    return opts.gpus_per_worker > 0 if opts.decode_stage is None else bool(opts.decode_stage)


def _run_dataset(ray, opts: BatchOptions, items: list[str], job: dict, todo: list[int], dest: Destination,
                 endpoint: str | None, *, plan: tuple[int, float, int], provider: str, decode: bool) -> None:
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ferry.cluster import quiet_ray_data

    quiet_ray_data()  # after ray.data's import, which sets up its own loggers
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    workers, cpus, threads = plan
    rows = job["part_rows"]
    parts = [{"part": p, "paths": items[p * rows:(p + 1) * rows]} for p in todo]
    # the tracker on the driver's node: the job lives and dies with that node anyway
    tracker = _part_tracker_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote()
    try:
        _execute(ray, opts, items, job, parts, dest, endpoint, tracker, workers=workers, cpus=cpus, threads=threads,
                 provider=provider, decode=decode)
    finally:
        try:
            ray.kill(tracker)
        except Exception:  # noqa: BLE001 - the cluster went with the job: the job's own error is the one to tell
            pass


def _execute(ray, opts: BatchOptions, items: list[str], job: dict, parts: list[dict], dest: Destination,
             endpoint: str | None, tracker, *, workers: int, cpus: float, threads: int, provider: str, decode: bool) -> None:
    """The Ray Data pipeline over `parts` (ray.data imported by the caller), its failure made one line."""
    import warnings

    rows = job["part_rows"]
    with warnings.catch_warnings():
        # max_retries, max_restarts and max_task_retries reach Ray Data only as `**ray_remote_args`, which
        # Ray >= 2.60 marks deprecated and names no replacement for: the bounds matter more than the notice
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        # one part a block: a read task reads a whole part, an actor call predicts and writes it
        ds = ray.data.from_items(parts, override_num_blocks=min(len(parts), 5000))
        ds = ds.map_batches(read_part, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                            fn_kwargs={"endpoint": endpoint}, max_retries=TASK_RETRIES)
        if decode:  # GPU jobs: decoding on CPU workers (as many as the cluster's CPUs allow) feeds the GPU actors
            from ferry.runtime import contract

            spec = contract.read(opts.model).preprocess.to_dict()
            ds = ds.map_batches(prepare_part, batch_size=1, batch_format="pyarrow", num_cpus=opts.decode_cpus,
                                fn_kwargs={"preprocess": spec, "tracker": tracker}, max_retries=TASK_RETRIES)
        model = str(Path(opts.model).resolve()) if not opts.address else ray.put(Path(opts.model).read_bytes())
        ds = ds.map_batches(
            PredictPart,
            fn_constructor_kwargs={"model": model, "model_name": Path(opts.model).name, "provider": provider,
                                   "threads": threads, "top_k": opts.top_k, "batch_size": opts.batch_size,
                                   "out": dest.location, "endpoint": endpoint, "job": job["job"],
                                   "throttle_ms": opts.throttle_ms, "prepared": decode, "min_score": opts.min_score,
                                   "tracker": tracker},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=opts.gpus_per_worker or None,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
    try:
        for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass  # a few numbers a part; the rows are in --out already
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's wrapping of a worker's error: one line for the user
        cause: BaseException = exc
        for _ in range(10):  # Ray wraps a worker's exception (RayTaskError, UserCodeException): its cause
            inner = getattr(cause, "cause", None) or cause.__cause__
            if not isinstance(inner, BaseException) or inner is cause:
                break
            cause = inner
        died = isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError))
        crashed = _crashed(ray, tracker) if died else None
        if crashed:  # the retries ran out on a part whose worker process died on every attempt
            attempts, stage, part = crashed
            first, last = part * rows, min(len(items), (part + 1) * rows)
            doing = {"decode": "decoding", "predict": "predicting"}.get(stage, stage)
            raise FerryError(f"{part_name(part)} (inputs {first + 1}-{last} of {len(items)}: {items[first]} to "
                             f"{items[last - 1]}) failed on each of its {attempts} attempts: the worker process {doing} "
                             f"it died every time ({reason(cause)}), so one of these inputs may crash it; the parts "
                             f"written so far are kept: run again with --resume to finish the rest") from exc
        raise FerryError(f"the job failed on a worker: {reason(cause)}; the parts written so far are kept: fix the "
                         f"cause and run again with --resume") from exc


def _crashed(ray, tracker) -> tuple[int, str, int] | None:
    """(attempts, stage, part) of the part begun most often without being finished, if its attempts
    reached its stage's bound (every retry spent); None otherwise, or when the tracker cannot tell."""
    try:
        crashed = ray.get(tracker.crashed.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the tracker cannot be reached: the message goes without the part
        return None
    bound = {"decode": TASK_RETRIES + 1, "predict": ACTOR_TASK_RETRIES + 1}
    spent = [c for c in crashed if c[0] >= bound.get(c[1], 1)]
    return spent[0] if spent else None
