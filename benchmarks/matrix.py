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
# Detection-size inputs (a torchvision detector's 800x800) are heavy at any batch: few sizes.
_SMALL, _IMAGENET, _LARGE = "small", "imagenet", "large"
BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "default": {_SMALL: (1, 8, 32, 128, 256, 1024), _IMAGENET: (1, 8, 32), _LARGE: (1,)},
    "quick": {_SMALL: (1, 64), _IMAGENET: (1, 4), _LARGE: (1,)},
    "gpu": {_SMALL: (1, 32, 256, 1024, 4096), _IMAGENET: (1, 8, 32, 64, 128, 256), _LARGE: (1, 4, 8, 16)},
    "pytest": {_SMALL: (1, 64, 256), _IMAGENET: (1, 8), _LARGE: (1,)},
}
PLANS = tuple(BATCHES)
KNOWN_INPUT_SHAPES = {"mnist-cnn": (1, 28, 28)}
IMAGENET_INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class BackendSpec:
    name: str  # e.g. "torch-eager-cpu", "ort-cpu-int8", "ov-cpu-f32", "ferry-auto-fp32"
    engine: str  # torch | torch-compile | onnxruntime | openvino | ferry (the runtime's own `auto` choice)
    device: str  # cpu | cuda | auto (ferry's auto: CUDA where it works)
    precision: str  # the arithmetic: fp32 | int8 | fp16 | bf16
    provider: str = ""  # the runtime's provider: cpu | cuda | tensorrt | openvino | openvino-bf16 | auto

    @property
    def file(self) -> str:
        """Which file of the model set it runs: bf16 runs the fp32 file."""
        return "fp32" if self.precision == "bf16" else self.precision

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


ALL_BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("torch-eager-cpu", "torch", "cpu", "fp32"),
    BackendSpec("torch-compile-cpu", "torch-compile", "cpu", "fp32"),
    BackendSpec("ort-cpu-fp32", "onnxruntime", "cpu", "fp32", "cpu"),
    BackendSpec("ort-cpu-int8", "onnxruntime", "cpu", "int8", "cpu"),
    BackendSpec("ov-cpu-f32", "openvino", "cpu", "fp32", "openvino"),
    BackendSpec("ov-cpu-bf16", "openvino", "cpu", "bf16", "openvino-bf16"),
    BackendSpec("ov-cpu-int8", "openvino", "cpu", "int8", "openvino"),
    BackendSpec("ferry-auto-fp32", "ferry", "auto", "fp32", "auto"),
    BackendSpec("ferry-auto-int8", "ferry", "auto", "int8", "auto"),
    BackendSpec("torch-eager-cuda", "torch", "cuda", "fp32"),
    BackendSpec("ort-cuda-fp32", "onnxruntime", "cuda", "fp32", "cuda"),
    BackendSpec("ort-cuda-fp16", "onnxruntime", "cuda", "fp16", "cuda"),
    BackendSpec("ort-tensorrt-fp32", "onnxruntime", "cuda", "fp32", "tensorrt"),
)
BACKENDS = {b.name: b for b in ALL_BACKENDS}
# torch.compile recompiles for every new batch size (tens of seconds each on a small CPU): the
# default plan compiles it for single-stream (batch 1) only; `--compile-all-batches` lifts that.
COMPILE_BATCH_ONE_ONLY = True

# Speed-up ratios the report computes (fast backend, slow backend, label), from rows of one run:
# on the CPU from the same interleaved rounds (each round runs every backend in turn).
RATIO_PAIRS = (
    ("ort-cpu-fp32", "torch-eager-cpu", "onnxruntime fp32 vs PyTorch eager (CPU)"),
    ("ort-cpu-int8", "torch-eager-cpu", "onnxruntime int8 vs PyTorch eager (CPU)"),
    ("torch-compile-cpu", "torch-eager-cpu", "torch.compile (inductor) vs PyTorch eager (CPU)"),
    ("ort-cpu-fp32", "torch-compile-cpu", "onnxruntime fp32 vs torch.compile (CPU)"),
    ("ort-cpu-int8", "ort-cpu-fp32", "int8 vs fp32 (onnxruntime CPU)"),
    ("ov-cpu-f32", "ort-cpu-fp32", "OpenVINO f32 vs onnxruntime fp32 (CPU)"),
    ("ov-cpu-int8", "ort-cpu-int8", "OpenVINO int8 vs onnxruntime int8 (CPU)"),
    ("ov-cpu-bf16", "ov-cpu-f32", "OpenVINO bf16 vs OpenVINO f32 (CPU)"),
    ("ferry-auto-fp32", "torch-eager-cpu", "ferry auto (fp32 file) vs PyTorch eager"),
    ("ferry-auto-fp32", "ort-cpu-fp32", "ferry auto (fp32 file) vs onnxruntime fp32"),
    ("ferry-auto-fp32", "ov-cpu-f32", "ferry auto (fp32 file) vs OpenVINO f32"),
    ("ferry-auto-fp32", "ov-cpu-bf16", "ferry auto (fp32 file) vs OpenVINO bf16"),
    ("ferry-auto-int8", "ov-cpu-int8", "ferry auto (int8 file) vs OpenVINO int8"),
    ("ferry-auto-int8", "ort-cpu-int8", "ferry auto (int8 file) vs onnxruntime int8"),
    ("torch-eager-cuda", "torch-eager-cpu", "GPU vs CPU (PyTorch eager)"),
    ("ort-cuda-fp32", "ort-cpu-fp32", "GPU vs CPU (onnxruntime fp32)"),
    ("ort-cuda-fp16", "ort-cpu-fp32", "GPU fp16 vs CPU fp32 (onnxruntime)"),
    ("ort-cuda-fp32", "torch-eager-cuda", "onnxruntime CUDA fp32 vs PyTorch eager CUDA"),
    ("ort-cuda-fp16", "torch-eager-cuda", "onnxruntime CUDA fp16 vs PyTorch eager CUDA (fp32)"),
)


@dataclass(frozen=True)
class Check:
    """A claim the benchmark checks at batch 1 on the CPU: `subject`'s latency is at most `factor`
    times that of the fastest of `against` over the run (factor < 1: that many times faster)."""

    name: str
    subject: str
    against: tuple[str, ...]
    factor: float
    cpu_classes: str  # "bf16": CPUs with bf16; "no-bf16": the others; "all"


CHECKS = (
    Check("ferry auto is no slower than the faster of onnxruntime and OpenVINO (fp32 file)", "ferry-auto-fp32",
          ("ort-cpu-fp32", "ov-cpu-f32"), 1.0, "no-bf16"),
    Check("ferry auto is no slower than 1.05x the fastest OpenVINO configuration (fp32 file)", "ferry-auto-fp32",
          ("ov-cpu-f32", "ov-cpu-bf16"), 1.05, "bf16"),
    Check("ferry auto is at least 3x faster than PyTorch eager (fp32 file)", "ferry-auto-fp32", ("torch-eager-cpu",),
          1 / 3, "bf16"),
    Check("ferry's int8 is no slower than 1.05x OpenVINO's int8", "ferry-auto-int8", ("ov-cpu-int8",), 1.05, "all"),
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
    area = shape[-1] * shape[-2]
    size = _SMALL if area <= 64 * 64 else _IMAGENET if area <= 320 * 320 else _LARGE
    return BATCHES[plan][size]


def onnx_path(models_dir: str | Path, model: str, precision: str) -> Path:
    """The model set's file for `precision` (the contract's file names)."""
    from ferry.runtime.contract import variant_path

    return variant_path(models_dir, model, precision)
