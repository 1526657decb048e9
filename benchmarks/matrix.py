"""The benchmark matrix, defined once: which models, which backends, which batch sizes, which input
shapes. `ferry bench`, the GPU script, the runtime-overhead measurement and the pytest-benchmark
suite all read it from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Models `ferry bench` measures when none are named: the two `make demo` exports.
DEFAULT_MODELS = ("mnist-cnn", "resnet50")

# Batch sizes per plan. The digit CNN is tiny, so its offline throughput keeps growing to large
# batches; ImageNet-size models saturate a CPU at small batches and a GPU at a few hundred.
_SMALL, _IMAGENET = "small", "imagenet"
BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "default": {_SMALL: (1, 8, 32, 128, 256, 1024), _IMAGENET: (1, 8, 32)},
    "quick": {_SMALL: (1, 64), _IMAGENET: (1, 4)},
    "gpu": {_SMALL: (1, 32, 256, 1024, 4096), _IMAGENET: (1, 8, 32, 64, 128, 256)},
    "pytest": {_SMALL: (1, 64, 256), _IMAGENET: (1, 8)},
}
PLANS = tuple(BATCHES)
KNOWN_INPUT_SHAPES = {"mnist-cnn": (1, 28, 28)}
IMAGENET_INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class BackendSpec:
    name: str  # e.g. "torch-eager-cpu", "ort-cpu-int8"
    engine: str  # torch | onnxruntime
    device: str  # cpu | cuda
    precision: str  # fp32 | int8 | fp16
    provider: str = ""  # ORT: cpu | cuda | tensorrt


ALL_BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("torch-eager-cpu", "torch", "cpu", "fp32"),
    BackendSpec("torch-eager-cuda", "torch", "cuda", "fp32"),
    BackendSpec("ort-cpu-fp32", "onnxruntime", "cpu", "fp32", "cpu"),
    BackendSpec("ort-cpu-int8", "onnxruntime", "cpu", "int8", "cpu"),
    BackendSpec("ort-cuda-fp32", "onnxruntime", "cuda", "fp32", "cuda"),
    BackendSpec("ort-cuda-fp16", "onnxruntime", "cuda", "fp16", "cuda"),
    BackendSpec("ort-tensorrt-fp32", "onnxruntime", "cuda", "fp32", "tensorrt"),
)
BACKENDS = {b.name: b for b in ALL_BACKENDS}

# Speed-up ratios the report computes (fast backend, slow backend, label), from rows of one run.
RATIO_PAIRS = (
    ("ort-cpu-fp32", "torch-eager-cpu", "onnxruntime fp32 vs PyTorch eager (CPU)"),
    ("ort-cpu-int8", "torch-eager-cpu", "onnxruntime int8 vs PyTorch eager (CPU)"),
    ("ort-cpu-int8", "ort-cpu-fp32", "int8 vs fp32 (onnxruntime CPU)"),
    ("torch-eager-cuda", "torch-eager-cpu", "GPU vs CPU (PyTorch eager)"),
    ("ort-cuda-fp32", "ort-cpu-fp32", "GPU vs CPU (onnxruntime fp32)"),
    ("ort-cuda-fp16", "ort-cpu-fp32", "GPU fp16 vs CPU fp32 (onnxruntime)"),
    ("ort-cuda-fp32", "torch-eager-cuda", "onnxruntime CUDA fp32 vs PyTorch eager CUDA"),
    ("ort-cuda-fp16", "torch-eager-cuda", "onnxruntime CUDA fp16 vs PyTorch eager CUDA (fp32)"),
)


def input_shape(model: str, models_dir: str | Path | None = None) -> tuple[int, ...]:
    """(C, H, W) of one input: from the exported model's metadata when it is there, else the known
    shape (the digit CNN) or ImageNet's 3x224x224."""
    if models_dir is not None:
        path = onnx_path(models_dir, model, "fp32")
        if path.is_file():
            from ferry.runtime import contract

            return contract.read(path).input_shape
    return KNOWN_INPUT_SHAPES.get(model, IMAGENET_INPUT_SHAPE)


def batch_sizes(model: str, plan: str = "default", shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    if plan not in BATCHES:
        raise ValueError(f"unknown batch plan {plan!r}; choose one of {', '.join(PLANS)}")
    shape = shape or KNOWN_INPUT_SHAPES.get(model, IMAGENET_INPUT_SHAPE)
    size = _SMALL if shape[-1] * shape[-2] <= 64 * 64 else _IMAGENET
    return BATCHES[plan][size]


def onnx_path(models_dir: str | Path, model: str, precision: str) -> Path:
    """The model set's file for `precision` (the contract's file names)."""
    from ferry.runtime.contract import variant_path

    return variant_path(models_dir, model, precision)
