"""Backends under test. Each says whether it can run here (and why not); none is ever replaced
by another. The provider recorded for an onnxruntime backend is read back from its session, and
so are its threads.

Every backend's `run` takes the same host (numpy) batch and returns host logits, so on a GPU
PyTorch and onnxruntime time the same work: the input copy to the device, the model, and the
output copy back (onnxruntime through IO binding, PyTorch through .to() and .cpu())."""

from __future__ import annotations

import time
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
    """A backend ready to run one model: `run(x)` does one inference on a host (numpy) batch."""

    spec: BackendSpec
    run: Callable[[np.ndarray], Any]
    sync: Callable[[], None]
    provider_used: str  # read back (the runtime's engines) or the torch device
    device_name: str
    load_seconds: float
    threads: int  # intra-op threads, read back from the engine or torch.get_num_threads()
    detail: str = ""  # e.g. where onnxruntime placed the nodes of a GPU session, or what auto chose and why
    precision: str = ""  # the arithmetic read back from the engine, where it says
    first_ms: float = float("nan")  # the first inference, set by the suite
    release: Callable[[], None] = lambda: None

    def close(self) -> None:
        """Release the backend now (its threads and memory): one run keeps many alive side by side."""
        self.release()


def check_provider(spec: BackendSpec, provider_used: str) -> None:
    """Refuse to record a run on another device than the backend claims (ferry's `auto` claims
    none: it records what it chose)."""
    if spec.device == "auto":
        return
    on_gpu = provider_used in ("CUDAExecutionProvider", "TensorrtExecutionProvider") or provider_used.startswith("cuda")
    if (spec.device in GPU_DEVICES) != on_gpu:
        raise ProviderMismatch(f"{spec.name} claims {spec.device} but ran on {provider_used}")
    if spec.provider == "tensorrt" and provider_used != "TensorrtExecutionProvider":
        raise ProviderMismatch(f"{spec.name} claims TensorRT but ran on {provider_used}")
    if spec.engine == "openvino" and not provider_used.startswith("OpenVINO"):
        raise ProviderMismatch(f"{spec.name} claims OpenVINO but ran on {provider_used}")


def prepare_runtime(spec: BackendSpec, model: str, models_dir: Path, *, threads: int | None) -> Prepared:
    """A model through ferry's own runtime (`Classifier`: onnxruntime, OpenVINO, or its `auto`
    choice), timed without the runtime's input checks (`Classifier.infer`). A stale variant
    (IncoherentModelSet) is an error, not a skip: its figures would describe another model."""
    from ferry.runtime.detector import open_model
    from ferry.runtime.providers import ProviderError

    path = onnx_path(models_dir, model, spec.file)
    if not path.exists():
        raise Unavailable(f"{path} not found (ferry export {model} ... --{spec.file})")
    t0 = time.perf_counter()
    try:
        clf = open_model(path, provider=spec.provider, threads=threads)  # a detector's infer: its whole graph, NMS included
    except ProviderError as exc:
        raise Unavailable(str(exc)) from exc
    load = time.perf_counter() - t0
    check_provider(spec, clf.provider.used)
    placement = clf.provider.placement
    detail = f"nodes per provider: {placement['by_provider']}" if placement else ""
    if spec.engine == "ferry":
        detail = clf.provider.note
    return Prepared(spec, clf.infer, lambda: None, clf.provider.used, device_label(spec.device), load,
                    clf.provider.threads, detail, precision=clf.provider.precision, release=clf.engine.close)


prepare_ort = prepare_runtime  # the name the GPU script and older callers use


def torch_model(model: str, checkpoint: str | None, models_dir: str | Path | None = None):
    """The PyTorch baseline: the trained CNN when a checkpoint is given; otherwise the architecture
    the exported model's metadata names (`source.arch`), with random weights (seed 0; speed does
    not depend on the weights) and the exported number of classes. A detector: its inference form
    (`InferenceDetector`, the post-processing included), from its checkpoint when given, else as
    `ferry export ARCH --weights none` builds it (seed 0)."""
    import torch

    from ferry.runtime import contract

    source: dict = {}
    meta = None
    fp32 = onnx_path(models_dir, model, "fp32") if models_dir is not None else None
    if fp32 is not None and fp32.is_file():
        meta = contract.read(fp32)
        source = {**meta.info.get("source", {}), "num_classes": meta.num_classes}
    arch = source.get("arch") or model
    torch.manual_seed(0)
    if meta is not None and meta.task == "detect":
        return _torch_detector(meta, arch, checkpoint)
    if arch == "mnist-cnn":
        from ferry.models import checkpoint as ckpt
        from ferry.models.digit_cnn import DigitCNN

        if checkpoint:
            return ckpt.digit_cnn_from_state(ckpt.load_digit_cnn_state(checkpoint), checkpoint)
        # the exported model's recipe; the default network without metadata
        return DigitCNN.from_config(source.get("train_config") or {"hidden": DigitCNN().hidden}).eval()
    from ferry.models import tvmodels

    try:
        tvmodels.check_arch(arch)
    except FerryError as exc:
        raise Unavailable(f"no PyTorch baseline for {model}: {exc}") from exc
    return tvmodels.create(arch, tvmodels.Weights("none"), num_classes=source.get("num_classes"))[0]


def prepare_torch(spec: BackendSpec, model: str, checkpoint: str | None, *, threads: int | None,
                  models_dir: str | Path | None = None) -> Prepared:
    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    device = torch.device(spec.device)
    net = torch_model(model, checkpoint, models_dir).to(device)
    detail = ""
    if spec.engine == "torch-compile":
        import logging

        logging.getLogger("torch._inductor").setLevel(logging.ERROR)
        try:
            net = torch.compile(net)  # inductor; compiles on the first call (the suite's first inference)
        except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported platform
            raise Unavailable(f"torch.compile is not available here: {type(exc).__name__}: {exc}") from exc
        detail = "torch.compile(inductor), default mode"

    def run(x: np.ndarray):
        with torch.inference_mode():
            out = net(torch.from_numpy(x).to(device))
            return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()  # a detector: boxes, scores, labels

    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    load = time.perf_counter() - t0
    used = f"cuda:{torch.cuda.current_device()}" if spec.device == "cuda" else "cpu"
    check_provider(spec, used)
    return Prepared(spec, run, sync, used, device_label(spec.device), load, torch.get_num_threads(), detail,
                    precision="fp32")


def gpu_name() -> str | None:
    """The CUDA device PyTorch sees, or None (also when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def device_label(device: str) -> str:
    if device == "cuda" or (device == "auto" and gpu_name()):
        import torch

        return torch.cuda.get_device_name(0)
    from ferry.core.machine import cpu_model

    return cpu_model()


def _torch_detector(meta, arch: str, checkpoint: str | None):
    """A detector's PyTorch inference form, for the baseline rows: what `ferry export` exported."""
    from ferry.models import checkpoint as ckpt
    from ferry.models import detectors, tvmodels

    if checkpoint:
        return ckpt.detector_from_state(ckpt.load_detector_state(checkpoint), checkpoint)[1]
    if not meta.untrained:  # NMS's work depends on the scores: random weights would time another workload
        raise Unavailable(f"no PyTorch baseline for the trained detector {meta.model} without its checkpoint "
                          f"(--checkpoint {meta.model}=PATH)")
    import torch

    torch.manual_seed(0)  # as `ferry export` seeds an untrained detector: the same random weights on both sides
    spec, det = meta.preprocess, meta.detection
    small = detectors.SmallConfig.from_dict(meta.info["source"]["small"]) if (meta.info.get("source") or {}).get("small") else None
    model, _ = detectors.build(arch, len(det.categories), tvmodels.Weights("none"), image_size=spec.size[0], mean=spec.mean,
                               std=spec.std, small=small)
    post = detectors.PostProcess(score_threshold=det.score_threshold, iou_threshold=det.iou_threshold,
                                 max_detections=det.max_detections)
    return detectors.InferenceDetector(model, arch, spec.size, post)
