"""`export_model(...)`: export, validate, stamp metadata and write variants, atomically.

Nothing is written at the output path unless every check passed: each file is built under a
temporary name in the output folder and renamed into place at the end.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path
from ferry.export import onnx_export as ox
from ferry.export.models import MODELS, LoadedModel, load_mnist_cnn, load_resnet50
from ferry.runtime.presets import input_shape


@dataclass
class ExportOptions:
    """What to export and how to check it."""

    model: str
    out: str
    checkpoint: str | None = None  # mnist-cnn: the ferry checkpoint
    weights: str = "IMAGENET1K_V1"  # resnet50: IMAGENET1K_V1 | IMAGENET1K_V2 | none | PATH
    data_dir: str = "data"  # mnist-cnn: MNIST for the 10,000-image check and int8 calibration
    int8: bool = False
    fp16: bool = False
    calib_dir: str | None = None  # resnet50 --int8: folder of calibration images
    calib_images: int = 1000  # mnist-cnn: training images used to calibrate int8
    opset: int = ox.DEFAULT_OPSET
    atol: float = 1e-4  # fp32 onnxruntime vs PyTorch
    int8_max_drop_pp: float = 0.1  # mnist-cnn: allowed int8 accuracy loss (percentage points)
    seed: int = 0


@dataclass
class ExportResult:
    paths: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)


def _check_options(opts: ExportOptions) -> None:
    if opts.model not in MODELS:
        raise FerryError(f"unknown model {opts.model!r}; choose one of {', '.join(MODELS)}")
    if opts.model == "mnist-cnn" and not opts.checkpoint:
        raise FerryError("mnist-cnn needs --checkpoint PATH (the checkpoint.pt that `ferry train` wrote)")
    if opts.model == "resnet50" and opts.int8 and not opts.calib_dir:
        raise FerryError("resnet50 --int8 needs --calib-dir DIR: a folder of images to calibrate on")
    if opts.opset < 17:
        raise FerryError(f"--opset must be >= 17 (got {opts.opset})")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise FerryError(f"--out {out} exists and is not a folder")


def export_model(opts: ExportOptions, *, log: Callable[[str], None] = print) -> ExportResult:
    _check_options(opts)
    out = Path(opts.out)
    # Load everything that can fail before anything is written.
    if opts.model == "mnist-cnn":
        loaded = load_mnist_cnn(opts.checkpoint)
        from ferry.export.digits import load_mnist_for_export

        mnist = load_mnist_for_export(opts.data_dir, calib_images=opts.calib_images, seed=opts.seed)
        calib = mnist.calib_x
    else:
        loaded = load_resnet50(opts.weights)
        mnist = None
        calib = None
        if opts.int8:
            from ferry.export.images import load_calibration_images

            calib = load_calibration_images(opts.calib_dir, loaded.preprocess)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(f"cannot create output folder {out}: {exc.strerror}") from exc

    result = ExportResult()
    rng = np.random.default_rng(opts.seed)
    chw = input_shape(loaded.preprocess)
    sizes = (1, 3, 16) if loaded.name == "mnist-cnn" else (1, 2, 4)
    random_batches = [rng.standard_normal((n, *chw), dtype=np.float32) for n in sizes]
    base_meta = _base_metadata(loaded, opts)

    fp32_path = out / f"{loaded.name}.onnx"
    log(f"exporting {loaded.name} ({loaded.weights}) to {fp32_path} (opset {opts.opset})")
    with atomic_path(fp32_path) as tmp:
        import torch

        ox.export_to_onnx(loaded.module, torch.from_numpy(random_batches[0]), tmp, opset=opts.opset)
        ox.check_model(tmp, name=fp32_path.name)
        validation = {"onnx_checker": "full_check passed", "random_inputs": ox.compare_with_torch(tmp, loaded.module, random_batches, atol=opts.atol)}
        if mnist is not None:
            from ferry.export.digits import check_on_mnist

            validation["mnist_test"] = check_on_mnist(tmp, loaded.module, mnist)
        meta = {**base_meta, "precision": "fp32", "validation": validation}
        ox.write_metadata(tmp, meta)  # metadata_props only: the graph checked above is unchanged
    result.paths["fp32"], result.metadata["fp32"] = fp32_path, meta
    log(f"  fp32 ok: max |ORT - PyTorch| {validation['random_inputs']['max_abs_diff']:.2e} (atol {opts.atol:g})"
        + (f"; MNIST test accuracy {validation['mnist_test']['onnx_accuracy']:.4%}, top-1 identical on "
           f"{validation['mnist_test']['images']} images" if mnist is not None else ""))

    if opts.int8:
        from ferry.export.variants import make_int8

        path, meta = make_int8(fp32_path, base_meta, calib, mnist=mnist, max_drop_pp=opts.int8_max_drop_pp,
                               eval_batches=random_batches, log=log)
        result.paths["int8"], result.metadata["int8"] = path, meta
    if opts.fp16:
        from ferry.export.variants import make_fp16

        path, meta = make_fp16(fp32_path, base_meta, mnist=mnist, eval_batches=random_batches, log=log)
        result.paths["fp16"], result.metadata["fp16"] = path, meta
    return result


def _base_metadata(loaded: LoadedModel, opts: ExportOptions) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {
        "model": loaded.name,
        "labels": loaded.labels,
        "preprocess": loaded.preprocess,
        "weights": loaded.weights,
        "untrained": loaded.untrained,
        "input": {"name": ox.INPUT_NAME, "shape": ["batch", *input_shape(loaded.preprocess)], "dtype": "float32"},
        "output": {"name": ox.OUTPUT_NAME, "shape": ["batch", len(loaded.labels)], "kind": "logits"},
        "exported": {
            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "opset": opts.opset,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        **({"source": loaded.extra} if loaded.extra else {}),
    }

