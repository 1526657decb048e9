"""`--provider auto`: CUDA where it works; on the CPU, the fastest validated engine and precision
for this model on this CPU, measured once and cached.

On the CPU the candidates are onnxruntime, OpenVINO at f32 (when `ferry[openvino]` is installed)
and OpenVINO at bf16 (only where the CPU has bf16 instructions and the model's bf16 accuracy was
validated at export). With one candidate there is nothing to measure. With several, the first
start times each at batch 1 in interleaved rounds (the same input, one engine after another, so
machine noise hits all alike), picks the lowest median (onnxruntime unless another engine beats it
by more than TIE: a closer gap is within what seven short rounds can tell apart) and writes the
choice to a cache keyed by
the model file's sha256, the CPU (model, generation, class and flags), the threads and the
engines' versions; every later start reads the cache and measures nothing, so a given cache
always gives the same choice.
Override it with an explicit provider (`--provider cpu|openvino`), or delete the cache file
(`$FERRY_CACHE_DIR/auto-choices.json`, by default `~/.cache/ferry/`) to measure again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.fileio import sha256_file, write_json_atomic
from ferry.runtime.contract import ModelMetadata
from ferry.runtime.providers import ProviderInfo, create_session, default_threads

CACHE_FILE = "auto-choices.json"
ROUNDS = 7  # interleaved rounds of the first measurement
ROUND_SECONDS = 0.1  # each engine's share of one round (at least 3 calls)
TIE = 0.03  # another engine is chosen over onnxruntime only when its median is this much lower (a 0.2% gap once chose the slower)


def cache_dir() -> Path:
    """$FERRY_CACHE_DIR, else $XDG_CACHE_HOME/ferry, else ~/.cache/ferry."""
    if os.environ.get("FERRY_CACHE_DIR"):
        return Path(os.environ["FERRY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ferry"


def cache_key(path: str | Path, threads: int) -> str:
    """The model file's sha256, the CPU (its model name, vendor/family/model, class and the flags that
    change inference: one class holds CPUs with and without bf16, and a VM's model name may not
    tell generations apart), the threads and the engines' versions."""
    from ferry.core import machine

    v = machine.versions(("onnxruntime", "onnxruntime-gpu", "openvino"))
    engines = ",".join(f"{k}={val}" for k, val in v.items() if val)
    text = machine.cpuinfo_text()  # read once for the three readings below
    flags = machine.cpu_flags(text)
    cpu = f"{machine.cpu_model(text)}|{machine.cpu_id(text)}|{machine.cpu_class(flags)}|{'+'.join(flags)}"
    return f"{sha256_file(path)}|{cpu}|threads={threads}|{engines}"


def _read_cache(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _usable(record: Any, names: list[str]) -> bool:
    """A cached choice as `_choose` writes it: one of `names`, with a number of milliseconds for
    each engine measured. Anything else (a hand-edited or damaged entry) is measured again."""
    if not isinstance(record, dict) or record.get("choice") not in names:
        return False
    medians = record.get("median_ms")
    return isinstance(medians, dict) and bool(medians) and all(
        isinstance(n, str) and isinstance(ms, (int, float)) and not isinstance(ms, bool) for n, ms in medians.items())


def _write_cache(folder: Path, key: str, record: dict[str, Any]) -> Path | None:
    target = folder / CACHE_FILE
    data = _read_cache(folder)
    data[key] = record
    try:
        write_json_atomic(target, data)
    except (FerryError, OSError):
        return None  # a read-only home: the choice still holds for this process
    return target


def candidates(meta: ModelMetadata) -> tuple[list[str], list[str]]:
    """(the CPU engines auto may choose from for this model here, why others are not offered)."""
    from ferry.runtime.openvino_engine import bf16_status, openvino_available

    names, notes = ["cpu"], []
    if not openvino_available():
        notes.append("OpenVINO not installed (pip install 'ferry[openvino]' to compare it)")
        return names, notes
    names.append("openvino")
    ok, why = bf16_status(meta)
    if ok:
        names.append("openvino-bf16")
    elif meta.precision == "fp32":
        notes.append(f"bf16 not offered: {why}")
    return names, notes


def _label(name: str, meta: ModelMetadata) -> str:
    if name == "openvino-bf16":
        return "OpenVINO bf16"
    engine = "onnxruntime" if name == "cpu" else "OpenVINO"
    return f"{engine} {meta.precision if meta.precision != 'fp32' or name == 'cpu' else 'f32'}"


def measure(engines: dict[str, Any], x: np.ndarray, *, rounds: int = ROUNDS, round_seconds: float = ROUND_SECONDS
            ) -> dict[str, float]:
    """Median seconds per call at batch 1 of each engine, timed in interleaved rounds."""
    times: dict[str, list[float]] = {n: [] for n in engines}
    for e in engines.values():  # warm-up: first calls allocate and tune
        for _ in range(3):
            e.infer(x)
    for _ in range(rounds):
        for name, e in engines.items():
            e.infer(x)  # the previous engine's threads settle before the timed calls
            spent, calls = 0.0, 0
            while calls < 3 or spent < round_seconds:
                t0 = time.perf_counter()
                e.infer(x)
                dt = time.perf_counter() - t0
                times[name].append(dt)
                spent, calls = spent + dt, calls + 1
    return {n: float(np.median(t)) for n, t in times.items()}


def open_auto(path: str | Path, meta: ModelMetadata, *, threads: int | None = None, **session_kwargs: Any):
    """The engine `--provider auto` runs `path` on (see the module docstring)."""
    from ferry.runtime.engines import OrtEngine
    from ferry.runtime.providers import PROVIDERS, _import_ort

    ort = session_kwargs.get("ort") or _import_ort()
    cpu_session = None
    why_not_cuda = "no CUDA in this onnxruntime build"
    if PROVIDERS["cuda"] in ort.get_available_providers():  # CUDA first, where it works
        session, info = create_session(path, "auto", threads=threads, precision=meta.precision, **session_kwargs)
        if info.is_gpu:
            return OrtEngine(session, info)
        cpu_session, why_not_cuda = (session, info), info.note.split("; ")[0]

    def ort_cpu() -> OrtEngine:
        session, info = cpu_session or create_session(path, "cpu", threads=threads, precision=meta.precision,
                                                      **session_kwargs)
        return OrtEngine(session, info)

    names, notes = candidates(meta)
    if len(names) == 1:
        engine = ort_cpu()
        engine.info = _with_note(engine.info, "; ".join([f"auto: {_label('cpu', meta)}, the only CPU engine here",
                                                         *notes, why_not_cuda]))
        return engine

    threads = threads or default_threads()
    folder = cache_dir()
    key = cache_key(path, threads)
    with _measuring_lock(folder):  # processes starting together (serve workers, batch actors) measure once
        engine, choice, how = _choose(path, meta, names, key, folder, threads, ort_cpu)
    engine.info = _with_note(engine.info, "; ".join([f"auto: {_label(choice, meta)}, {how}", *notes, why_not_cuda]))
    return engine


@contextlib.contextmanager
def _measuring_lock(folder: Path):
    """An exclusive lock on the cache folder while one process reads, measures and writes; where
    the folder cannot be made, no lock (each process then measures for itself)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def _choose(path, meta: ModelMetadata, names: list[str], key: str, folder: Path, threads: int, ort_cpu):
    from ferry.runtime.engines import open_engine

    record = _read_cache(folder).get(key)
    if _usable(record, names):
        choice = record["choice"]
        how = (f"cached choice for this model and CPU ({_medians(record.get('median_ms', {}), meta)} at batch 1, "
               f"measured {record.get('measured', '?')}; {folder / CACHE_FILE})")
        engine = ort_cpu() if choice == "cpu" else open_engine(path, choice, meta, threads=threads)
    else:
        engines: dict[str, Any] = {"cpu": ort_cpu()}
        for name in names[1:]:
            engines[name] = open_engine(path, name, meta, threads=threads)
        x = np.zeros((1, *meta.input_shape), np.float32)
        seconds = measure(engines, x)
        choice = pick(seconds)
        medians = {n: round(1e3 * s, 4) for n, s in seconds.items()}
        written = _write_cache(folder, key, {"choice": choice, "median_ms": medians, "model": str(path),
                                             "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        how = f"fastest at batch 1 on this CPU ({_medians(medians, meta)}, measured now" + \
            (f"; cached in {written})" if written else "; the cache could not be written)")
        engine = engines.pop(choice)
        for other in engines.values():
            other.close()
    return engine, choice, how


def pick(seconds: dict[str, float]) -> str:
    """The engine with the lowest median, but onnxruntime ("cpu") unless that one is more than TIE
    faster than it: a gap the start-up rounds cannot resolve keeps the default engine."""
    fastest = min(seconds, key=seconds.__getitem__)
    if "cpu" in seconds and seconds[fastest] > (1 - TIE) * seconds["cpu"]:
        return "cpu"
    return fastest


def _medians(medians: dict[str, float], meta: ModelMetadata) -> str:
    return " vs ".join(f"{_label(n, meta)} {ms:.3f} ms" for n, ms in sorted(medians.items(), key=lambda kv: kv[1]))


def _with_note(info: ProviderInfo, note: str) -> ProviderInfo:
    import dataclasses

    return dataclasses.replace(info, note=note, requested="auto")
