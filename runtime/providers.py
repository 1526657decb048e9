"""onnxruntime sessions with an explicit execution provider, read back from the session.

`auto` uses CUDA when it actually works and otherwise the CPU, and says why; an explicitly
requested GPU provider that cannot run is a ProviderError with the reason, never a CPU run.
"""

from __future__ import annotations

import importlib.metadata
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
CHOICES = ("auto", *PROVIDERS)

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


@dataclass(frozen=True)
class ProviderInfo:
    requested: str  # auto | cpu | cuda | tensorrt
    used: str  # the provider the session actually runs on (read back from the session)
    session_providers: tuple[str, ...]
    note: str = ""  # why auto fell back to the CPU, for instance

    @property
    def is_gpu(self) -> bool:
        return self.used in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])

    def describe(self) -> str:
        text = f"{self.used} (requested {self.requested})"
        return f"{text}; {self.note}" if self.note else text


def installed_ort_distributions(distributions: Callable[[], Any] = importlib.metadata.distributions) -> list[str]:
    names = set()
    for dist in distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith("onnxruntime") and name in {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                                                       "onnxruntime-openvino", "onnxruntime-training"}:
            names.add(name)
    return sorted(names)


def check_single_ort(distributions: Callable[[], Any] = importlib.metadata.distributions) -> None:
    """onnxruntime and onnxruntime-gpu share one import name and overwrite each other's files."""
    names = installed_ort_distributions(distributions)
    if len(names) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in names else names[-1]
        raise ProviderError(
            f"{' and '.join(names)} are installed together; they overwrite each other's files. Fix: "
            f"pip uninstall -y {' '.join(names)} && pip install {keep}"
        )


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
    ort: ModuleType | None = None,
    distributions: Callable[[], Any] = importlib.metadata.distributions,
) -> tuple[Any, ProviderInfo]:
    """Create an InferenceSession on `provider` and read back what it runs on.

    `ort` and `distributions` can be replaced (tests simulate GPUs that fail without one).
    """
    if provider not in CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(CHOICES)}")
    ort = ort or _import_ort()
    check_single_ort(distributions)
    path = Path(model_path)
    if not path.is_file():
        raise FerryError(f"model not found: {path}")

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads

    def make(providers: list[Any], *, gpu: bool = False):
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            message = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            if gpu:
                raise _SessionFailure(message) from exc
            raise FerryError(f"cannot load model {path}: {message}") from exc

    if provider == "cpu":
        session = make([PROVIDERS["cpu"]])
        return session, ProviderInfo("cpu", session.get_providers()[0], tuple(session.get_providers()))

    wanted = [PROVIDERS["cuda"]] if provider in ("auto", "cuda") else [PROVIDERS["tensorrt"], PROVIDERS["cuda"]]
    target = wanted[0]
    if target not in ort.get_available_providers():
        reason = _gpu_failure_reason(ort, target)
    else:
        preload_note = _preload_gpu_libraries(ort)
        options = {PROVIDERS["cuda"]: CUDA_OPTIONS, PROVIDERS["tensorrt"]: TENSORRT_OPTIONS}
        try:
            session = make([(p, options[p]) for p in wanted] + [PROVIDERS["cpu"]], gpu=True)
        except _SessionFailure as exc:
            make([PROVIDERS["cpu"]])  # a broken model file is reported as such, not as a GPU problem
            reason = _gpu_failure_reason(ort, target, str(exc))
        else:
            used = session.get_providers()
            if used and used[0] == target:
                return session, ProviderInfo(provider, used[0], tuple(used))
            # ORT quietly drops a provider that fails to initialise: the read-back catches it.
            reason = _gpu_failure_reason(ort, target, preload_note)
    if provider != "auto":
        raise ProviderError(f"--provider {provider} cannot run: {reason}")
    session = make([PROVIDERS["cpu"]])
    return session, ProviderInfo("auto", session.get_providers()[0], tuple(session.get_providers()),
                                 note=f"CUDA not used: {reason}")


class _SessionFailure(Exception):
    pass
