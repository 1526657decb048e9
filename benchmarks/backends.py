"""Backends under test. Each says whether it can run here (and why not); none is ever replaced
by another. The provider recorded for an onnxruntime backend is read back from its session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.bench.matrix import BackendSpec, onnx_path
from ferry.core.errors import FerryError

GPU_DEVICES = ("cuda",)


class Unavailable(Exception):
    """This backend cannot run here; the message says why."""


class ProviderMismatch(FerryError):
    """A row would claim a device its session did not run on (e.g. a CPU fallback as CUDA)."""


@dataclass
class Prepared:
    """A backend ready to run one model: `run(x)` does one inference on a numpy batch."""

    spec: BackendSpec
    run: Callable[[np.ndarray], Any]
    sync: Callable[[], None]
    provider_used: str  # read back (ORT) or the torch device
    device_name: str
    load_seconds: float
    to_input: Callable[[np.ndarray], Any] = lambda x: x


def check_provider(spec: BackendSpec, provider_used: str) -> None:
    """Refuse to record a run on another device than the backend claims."""
    on_gpu = provider_used in ("CUDAExecutionProvider", "TensorrtExecutionProvider") or provider_used.startswith("cuda")
    if (spec.device in GPU_DEVICES) != on_gpu:
        raise ProviderMismatch(f"{spec.name} claims {spec.device} but ran on {provider_used}")
    if spec.provider == "tensorrt" and provider_used != "TensorrtExecutionProvider":
        raise ProviderMismatch(f"{spec.name} claims TensorRT but ran on {provider_used}")


def prepare_ort(spec: BackendSpec, model: str, models_dir: Path, *, threads: int | None) -> Prepared:
    import time

    from ferry.runtime.classifier import Classifier
    from ferry.runtime.providers import ProviderError

    path = onnx_path(models_dir, model, spec.precision)
    if not path.exists():
        raise Unavailable(f"{path} not found (ferry export {model} ... --{spec.precision})")
    t0 = time.perf_counter()
    try:
        clf = Classifier.from_onnx(path, provider=spec.provider, threads=threads)
    except ProviderError as exc:
        raise Unavailable(str(exc)) from exc
    load = time.perf_counter() - t0
    check_provider(spec, clf.provider.used)
    return Prepared(spec, clf.run, lambda: None, clf.provider.used, device_label(spec.device), load)


def torch_model(model: str, checkpoint: str | None):
    """The PyTorch baseline: the trained CNN when a checkpoint is given, else random weights
    (seed 0, as `ferry export resnet50 --weights none`)."""
    import torch

    if model == "mnist-cnn":
        if checkpoint:
            from ferry.train.trainer import load_model

            return load_model(checkpoint)[0]
        from ferry.train.model import DigitCNN

        torch.manual_seed(0)
        return DigitCNN().eval()
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return resnet50(weights=None).eval()


def prepare_torch(spec: BackendSpec, model: str, checkpoint: str | None, *, threads: int | None) -> Prepared:
    import time

    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net = torch_model(model, checkpoint).to(spec.device)
    device = torch.device(spec.device)

    def to_input(x: np.ndarray):
        return torch.from_numpy(x).to(device)

    def run(x):
        with torch.inference_mode():
            return net(x)

    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    load = time.perf_counter() - t0
    used = f"cuda:{torch.cuda.current_device()}" if spec.device == "cuda" else "cpu"
    check_provider(spec, used)
    return Prepared(spec, run, sync, used, device_label(spec.device), load, to_input)


def gpu_name() -> str | None:
    """The CUDA device PyTorch sees, or None (also when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def device_label(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    from ferry.core.machine import cpu_model

    return cpu_model()
