"""onnxruntime sessions with an explicit execution provider, read back from the session.

`auto` uses CUDA when it actually works and otherwise the CPU, and says why; an explicitly
requested GPU provider that cannot run is a ProviderError with the reason, never a CPU run.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ferry.core.errors import FerryError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
ORT_PROVIDERS = tuple(PROVIDERS)
ORT_CHOICES = ("auto", *PROVIDERS)  # create_session's own: auto is CUDA when it works, else the CPU

# CUDA options that matter for convolution models: search for the fastest cuDNN algorithm once
# per shape and let it use as much workspace as it wants.
CUDA_OPTIONS = {
    "device_id": 0,
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "do_copy_in_default_stream": "1",
    "arena_extend_strategy": "kNextPowerOfTwo",
}
TENSORRT_OPTIONS = {"device_id": 0, "trt_fp16_enable": False, "trt_engine_cache_enable": False}


class ProviderError(FerryError):
    """A requested execution provider cannot run here."""


# Operators that carry a model's arithmetic: under an explicit GPU request none may run on the CPU.
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                       "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "Attention", "MultiHeadAttention"})


@dataclass(frozen=True)
class ProviderInfo:
    """What runs a model, read back from the engine, never assumed."""

    requested: str  # auto | cpu | cuda | tensorrt | openvino | openvino-bf16
    used: str  # what actually runs it: onnxruntime's provider (read back from the session), or "OpenVINO:CPU"
    session_providers: tuple[str, ...]
    note: str = ""  # why auto chose what it chose, or fell back to the CPU
    threads: int = 0  # intra-op threads, read back from the session's options (or OpenVINO's compiled model)
    placement: dict[str, Any] | None = None  # GPU sessions: nodes per provider, from onnxruntime's profile
    engine: str = "onnxruntime"  # onnxruntime | openvino
    precision: str = ""  # the arithmetic, read back where the engine says it: fp32, int8, fp16, bf16

    @property
    def is_gpu(self) -> bool:
        return self.used in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])

    def describe(self) -> str:
        precision = f", {self.precision}" if self.precision else ""
        text = f"{self.used} (requested {self.requested}{precision}, {self.threads} intra-op threads)"
        if self.placement and self.placement.get("cpu_nodes"):
            text += f"; {len(self.placement['cpu_nodes'])} small nodes on the CPU: {', '.join(sorted(set(self.placement['cpu_nodes'])))}"
        return f"{text}; {self.note}" if self.note else text


def installed_ort_distributions(distributions: Callable[[], Any] = importlib.metadata.distributions) -> list[tuple[str, str]]:
    """(name, folder) of every onnxruntime distribution visible on sys.path."""
    found = set()
    for dist in distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training"}:
            try:
                where = str(Path(dist.locate_file("")).resolve())
            except Exception:  # noqa: BLE001 - a distribution without a location
                where = "?"
            found.add((name, where))
    return sorted(found)


def check_single_ort(distributions: Callable[[], Any] = importlib.metadata.distributions) -> None:
    """onnxruntime and onnxruntime-gpu share one import name: installed into the same folder they
    overwrite each other's files. (Installed in different folders, the first on sys.path is used and
    the provider read-back says which one that was.)"""
    by_folder: dict[str, list[str]] = {}
    for name, where in installed_ort_distributions(distributions):
        by_folder.setdefault(where, []).append(name)
    for where, names in by_folder.items():
        if len(names) > 1:
            keep = "onnxruntime-gpu" if "onnxruntime-gpu" in names else names[-1]
            raise ProviderError(
                f"{' and '.join(names)} are installed together in {where}; they overwrite each other's files. Fix: "
                f"pip uninstall -y {' '.join(names)} && pip install {keep}"
            )


def default_threads() -> int:
    """Intra-op threads when none are asked for: the physical cores this process may use (what
    onnxruntime itself would pick), set explicitly so the number can be read back and reported."""
    from ferry.core.machine import physical_cores

    return physical_cores()


def _import_ort() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise FerryError("onnxruntime is not installed: pip install 'ferry[cpu]' (or 'ferry[gpu]' for CUDA)") from exc
    return onnxruntime


def _preload_gpu_libraries(ort: ModuleType) -> str:
    """onnxruntime >= 1.21 can load the CUDA/cuDNN libraries installed by pip (nvidia-* wheels)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - only a hint for the error message below
        return f"preload_dlls failed: {exc}"
    return ""


def check_gpu_build(provider: str) -> None:
    """A first check for --provider cuda or tensorrt that makes no session and touches no device
    (a TensorRT engine takes minutes to build): this onnxruntime build has the provider. Whether
    it starts is known when a session is made."""
    ort = _import_ort()
    target = PROVIDERS[provider]
    if target not in ort.get_available_providers():
        raise ProviderError(f"--provider {provider} cannot run: {_gpu_failure_reason(ort, target)}")


def _gpu_failure_reason(ort: ModuleType, provider: str, detail: str = "") -> str:
    available = ort.get_available_providers()
    if provider not in available:
        build = "the CPU build" if "CUDAExecutionProvider" not in available else "a build without it"
        fix = "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]'" if provider == PROVIDERS["cuda"] \
            else "install onnxruntime-gpu and TensorRT"
        return f"onnxruntime {ort.__version__} is {build} (available: {', '.join(available)}); {fix}"
    reason = "the provider failed to start: CUDA/cuDNN libraries not found, or no CUDA device"
    return f"{reason} ({detail})" if detail else reason


def create_session(
    model_path: str | Path,
    provider: str = "auto",
    *,
    threads: int | None = None,
    spinning: bool | None = None,
    ort: ModuleType | None = None,
    distributions: Callable[[], Any] = importlib.metadata.distributions,
    precision: str = "",
) -> tuple[Any, ProviderInfo]:
    """Create an InferenceSession on `provider` and read back what it runs on.

    `threads`: intra-op threads (default: the usable physical cores), read back from the session.
    `spinning`: False turns off the intra-op threads' busy-waiting (several sessions alive in one
    process then do not steal each other's cores); None keeps onnxruntime's default.
    A GPU session is profiled on one warm-up run to see where each node runs: under an explicit
    `cuda`/`tensorrt` request a Conv/Gemm/MatMul placed on the CPU is a ProviderError, and
    `tensorrt` that ends up on CUDA is one too. `ort` and `distributions` can be replaced (tests
    simulate GPUs that fail without one). `precision`: the model file's (onnxruntime runs a file's
    arithmetic as written), recorded in the info.
    """
    if provider not in ORT_CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(ORT_CHOICES)}")
    if threads is not None and threads < 1:
        raise ProviderError(f"threads must be >= 1 (got {threads})")
    ort = ort or _import_ort()
    check_single_ort(distributions)
    from ferry.runtime.contract import check_model_file

    path = Path(model_path)
    check_model_file(path)

    def options(profile_dir: str | None = None):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads or default_threads()
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if profile_dir:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ferry_placement")
        return opts

    def make(providers: list[Any], *, gpu: bool = False, profile_dir: str | None = None):
        try:
            return ort.InferenceSession(str(path), sess_options=options(profile_dir), providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            message = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if gpu:
                raise _SessionFailure(message) from exc
            raise FerryError(f"cannot load model {path}: {message}") from exc

    def info(session, requested: str, note: str = "", placement: dict | None = None) -> ProviderInfo:
        used = tuple(session.get_providers())
        return ProviderInfo(requested, used[0], used, note=note, threads=_threads_of(session), placement=placement,
                            precision=precision)

    if provider == "cpu":
        return (session := make([PROVIDERS["cpu"]])), info(session, "cpu")

    wanted = [PROVIDERS["cuda"]] if provider in ("auto", "cuda") else [PROVIDERS["tensorrt"], PROVIDERS["cuda"]]
    target = wanted[0]
    if target not in ort.get_available_providers():
        reason = _gpu_failure_reason(ort, target)
    else:
        preload_note = _preload_gpu_libraries(ort)
        gpu_options = {PROVIDERS["cuda"]: CUDA_OPTIONS, PROVIDERS["tensorrt"]: TENSORRT_OPTIONS}
        with tempfile.TemporaryDirectory(prefix="ferry-profile-") as profile_dir:
            try:
                session = make([(p, gpu_options[p]) for p in wanted] + [PROVIDERS["cpu"]], gpu=True, profile_dir=profile_dir)
            except _SessionFailure as exc:
                make([PROVIDERS["cpu"]])  # a broken model file is reported as such, not as a GPU problem
                reason = _gpu_failure_reason(ort, target, str(exc))
            else:
                used = session.get_providers()
                if used and used[0] == target:
                    placement = profile_placement(session)
                    misplaced = sorted({op for op in placement["cpu_nodes"] if op in HEAVY_OPS})
                    if misplaced and provider != "auto":
                        raise ProviderError(
                            f"--provider {provider}: onnxruntime placed {', '.join(misplaced)} nodes on the CPU "
                            f"({placement['by_provider']}); the model would not really run on the GPU")
                    note = f"heavy nodes on the CPU: {', '.join(misplaced)}" if misplaced else ""
                    return session, info(session, provider, note, placement)
                # ORT quietly drops a provider that fails to initialise: the read-back catches it.
                if provider == "tensorrt" and used and used[0] == PROVIDERS["cuda"]:
                    why = "TensorRT's libnvinfer cannot be loaded" if not _loadable("libnvinfer.so.10") \
                        else "TensorRT rejected the model"
                    reason = (f"TensorRT did not start ({why}); the session fell back to CUDAExecutionProvider, "
                              "which is not what was asked for")
                else:
                    reason = _gpu_failure_reason(ort, target, preload_note)
    if provider != "auto":
        raise ProviderError(f"--provider {provider} cannot run: {reason}")
    session = make([PROVIDERS["cpu"]])
    return session, info(session, "auto", note=f"CUDA not used: {reason}")


def _loadable(library: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _threads_of(session) -> int:
    try:
        return int(session.get_session_options().intra_op_num_threads)
    except Exception:  # noqa: BLE001 - a stand-in session in tests
        return 0


def _dummy_feed(session) -> dict[str, Any]:
    import numpy as np

    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dtype = np.float16 if "float16" in inp.type else np.float32
        feed[inp.name] = np.zeros(shape, dtype=dtype)
    return feed


def profile_placement(session) -> dict[str, Any]:
    """Run the session once on zeros with profiling on, end profiling and read which provider ran
    each node (onnxruntime's profile names it per node)."""
    session.run(None, _dummy_feed(session))
    trace = Path(session.end_profiling())
    try:
        return node_placement(json.loads(trace.read_text()))
    finally:
        trace.unlink(missing_ok=True)


def node_placement(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes per provider from an onnxruntime profile (its 'Node' events carry op_name and provider)."""
    seen: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and "op_name" in args:
            seen[ev.get("name", "").removesuffix("_kernel_time")] = (args["op_name"], args["provider"])
    by_provider: dict[str, int] = {}
    for _op, prov in seen.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
    cpu_nodes = sorted(op for op, prov in seen.values() if prov == PROVIDERS["cpu"])
    return {"nodes": len(seen), "by_provider": by_provider, "cpu_nodes": cpu_nodes}


class _SessionFailure(Exception):
    pass
