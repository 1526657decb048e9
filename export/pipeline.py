"""`export_model(...)`: export, validate, stamp metadata and write variants, atomically.

Nothing is written at the output path unless every check passed: each file is built under a
temporary name in the output folder and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.fileio import check_folder_writable, sha256_file
from ferry.core.machine import cpu_info
from ferry.export import onnx_export as ox
from ferry.export.evalset import ExportData, check_top1_against_torch
from ferry.export.models import CNN, LoadedModel, load_finetuned, load_mnist_cnn, load_torchvision
from ferry.runtime import contract
from ferry.runtime.contract import PRECISIONS, DerivedFrom, ModelMetadata, variant_filename


@dataclass
class ExportOptions:
    """What to export and how to check it."""

    model: str  # mnist-cnn, a torchvision classification architecture, or a detector (fcos_small, torchvision's)
    out: str
    checkpoint: str | None = None  # mnist-cnn: the ferry checkpoint; ARCH: a `ferry train --arch ARCH` checkpoint
    weights: str = "DEFAULT"  # ARCH without --checkpoint: a weights name of ARCH, none, or a state-dict file
    name: str | None = None  # the model's name in its metadata and file names (default: mnist-cnn or ARCH)
    data_dir: str | None = None  # mnist-cnn: MNIST; fine-tuned: the image folder (default: the checkpoint's); detector: the images of `annotations`
    annotations: str | None = None  # detector: a COCO JSON of images to check it on (default: the checkpoint's validation images)
    int8: bool = False
    fp16: bool = False
    calib_dir: str | None = None  # ARCH --int8 without --checkpoint: folder of calibration images
    calib_images: int = 1000  # mnist-cnn and fine-tuned: training images used to calibrate int8
    opset: int = ox.DEFAULT_OPSET
    atol: float | None = None  # classifiers: fp32 onnxruntime vs PyTorch (None: DEFAULT_ATOL); detectors have their own
    int8_max_drop_pp: float | None = None  # allowed int8 (and bf16) accuracy loss on labelled held-out images (None: the model's default)
    seed: int = 0
    bf16_check: dict[str, Any] = field(default_factory=dict)  # tests: stand-ins for OpenVINO's CPU capabilities and bf16 engine


DEFAULT_MAX_DROP_PP = {"mnist-cnn": 0.1, "fine-tuned": 0.5}
DEFAULT_ATOL = 1e-4  # fp32 onnxruntime vs PyTorch on random inputs (classifiers)


@dataclass
class ExportResult:
    paths: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, ModelMetadata] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _check_out(opts: ExportOptions) -> Path:
    """--name and --out, checked; the output folder."""
    if opts.name is not None and (not opts.name or "/" in opts.name or opts.name.startswith(".")):
        raise FerryError(f"--name {opts.name!r} is not a usable file name")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise FerryError(f"--out {out} exists and is not a folder")
    check_folder_writable(out, "--out")
    return out


def _check_options(opts: ExportOptions) -> None:
    from ferry.models.tvmodels import check_arch

    if opts.model != CNN:
        check_arch(opts.model)
    if opts.model == CNN and not opts.checkpoint:
        raise FerryError("mnist-cnn needs --checkpoint PATH (the checkpoint.pt that `ferry train` wrote)")
    if opts.model != CNN and not opts.checkpoint and opts.int8 and not opts.calib_dir:
        raise FerryError(f"{opts.model} --int8 needs --calib-dir DIR: a folder of images to calibrate on (a few hundred; "
                         "one in five is held out to measure int8 against fp32)")
    if opts.checkpoint and opts.calib_dir:
        raise FerryError("--calib-dir is for pretrained models; a checkpoint's int8 is calibrated on its own training images")
    ox.check_opset(opts.opset)
    if not opts.atol > 0:  # NaN too
        raise FerryError(f"--atol must be > 0 (got {opts.atol})")
    if opts.annotations:
        raise FerryError("--annotations is for detectors (a COCO JSON of images to check the detector on)")
    _check_out(opts)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside `out` (same file system, so the final renames are atomic) that is
    removed whatever happens: a failed export leaves nothing of itself behind."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=".ferry-export-", dir=out))
    except OSError as exc:
        raise FerryError(f"cannot write to --out {out}: {exc.strerror or exc}") from exc
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _load(opts: ExportOptions, log: Callable[[str], None]) -> tuple[LoadedModel, ExportData, float | None]:
    """Everything that can fail before anything is written: the model, the images to check it on,
    and the int8 gate that applies (None: no labels, report agreement only)."""
    if opts.model == CNN:
        from ferry.export.digits import load_mnist_for_export

        loaded = load_mnist_cnn(opts.checkpoint)
        loaded.name = opts.name or CNN
        data = load_mnist_for_export(opts.data_dir or "data", calib_images=opts.calib_images, seed=opts.seed)
        return loaded, data, _gate(opts, "mnist-cnn")
    if opts.checkpoint:
        from ferry.export.folder import load_folder_for_export

        loaded, state = load_finetuned(opts.checkpoint, arch=opts.model, name=opts.name)
        data = load_folder_for_export(opts.data_dir or state["data"]["root"], state, loaded.preprocess,
                                      calib_images=min(opts.calib_images, 500), seed=opts.seed, log=log)
        return loaded, data, _gate(opts, "fine-tuned")
    loaded = load_torchvision(opts.model, opts.weights, name=opts.name)
    if opts.calib_dir:
        from ferry.export.images import load_calibration_folder

        return loaded, load_calibration_folder(opts.calib_dir, loaded.preprocess), None
    return loaded, ExportData(calibration=None, evaluation=None, notes=[]), None


def _gate(opts: ExportOptions, kind: str) -> float:
    return DEFAULT_MAX_DROP_PP[kind] if opts.int8_max_drop_pp is None else opts.int8_max_drop_pp


def export_model(opts: ExportOptions, *, log: Callable[[str], None] = print) -> ExportResult:
    """Export, validate and write `<model>.onnx` and the asked-for variants into `opts.out` as one
    set: every file is built and checked in a staging folder and moved into place only when all
    passed. Variants of an earlier export that this one does not replace are removed (they were
    made from the previous fp32 file). A failure leaves the previous set as it was. A detector
    (fcos_small, torchvision's detectors) goes through `ferry.export.detect.export_detector`."""
    from ferry.models.detectors import is_detector

    if is_detector(opts.model):
        from ferry.export.detect import export_detector

        return export_detector(opts, log=log)
    if opts.atol is None:
        opts = dataclasses.replace(opts, atol=DEFAULT_ATOL)
    _check_options(opts)
    out = Path(opts.out)
    loaded, data, max_drop = _load(opts, log)
    for note in data.notes:
        log(f"  note: {note}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(f"cannot create output folder {out}: {exc.strerror}") from exc

    result = ExportResult(notes=list(data.notes))
    rng = np.random.default_rng(opts.seed)
    chw = loaded.preprocess.input_shape
    sizes = (1, 3, 16) if opts.model == CNN else (1, 2, 4)
    random_batches = [rng.standard_normal((n, *chw), dtype=np.float32) for n in sizes]
    base_meta = _base_metadata(loaded, opts)

    with _staging(out) as stage:
        fp32 = stage / variant_filename(loaded.name, "fp32")
        log(f"exporting {loaded.name} ({loaded.weights}) to {out / fp32.name} (opset {opts.opset})")
        import torch

        ox.export_to_onnx(loaded.module, torch.from_numpy(random_batches[0]), fp32, opset=opts.opset)
        ox.check_model(fp32, name=fp32.name)
        validation: dict[str, Any] = {
            "onnx_checker": "full_check passed",
            "random_inputs": ox.compare_with_torch(fp32, loaded.module, random_batches, atol=opts.atol),
        }
        if data.evaluation is not None:
            validation["held_out"] = check_top1_against_torch(fp32, loaded.module, data.evaluation)
        from ferry.export.variants import check_bf16

        bf16 = check_bf16(fp32, base_meta, evaluation=data.evaluation, eval_batches=random_batches, max_drop_pp=max_drop,
                          log=log, **opts.bf16_check)
        meta = base_meta.replace(precision="fp32", info={**base_meta.info, "validation": validation,
                                                         "precision_checks": {"bf16": bf16}})
        contract.write(fp32, meta)  # metadata_props only: the graph checked above is unchanged
        result.metadata["fp32"] = meta
        held = validation.get("held_out")
        log(f"  fp32 ok: max |ORT - PyTorch| {validation['random_inputs']['max_abs_diff']:.2e} (atol {opts.atol:g})"
            + (f"; top-1 identical to PyTorch on {held['dataset']}" if held else "")
            + (f", accuracy {held['onnx_accuracy']:.4%}" if held and "onnx_accuracy" in held else ""))

        derived = DerivedFrom(fp32.name, sha256_file(fp32))
        if opts.int8:
            from ferry.export.variants import make_int8

            if data.calibration is None:
                raise FerryError(f"{loaded.name} --int8 needs calibration images (--calib-dir DIR)")
            result.metadata["int8"] = make_int8(
                fp32, stage / variant_filename(loaded.name, "int8"), base_meta, data.calibration, derived_from=derived,
                evaluation=data.evaluation, max_drop_pp=max_drop, eval_batches=random_batches, log=log)
        if opts.fp16:
            from ferry.export.variants import make_fp16

            result.metadata["fp16"] = make_fp16(
                fp32, stage / variant_filename(loaded.name, "fp16"), base_meta, derived_from=derived,
                evaluation=data.evaluation, eval_batches=random_batches, log=log)
        _commit(stage, out, loaded.name, list(result.metadata), log)
    result.paths = {p: out / variant_filename(loaded.name, p) for p in result.metadata}
    return result


def _commit(stage: Path, out: Path, model: str, produced: list[str], log: Callable[[str], None]) -> None:
    """Move the checked files into place (variants first, the fp32 file they name last) and remove
    variants of an earlier export that this set does not replace."""
    for precision in sorted(produced, key=lambda p: p == "fp32"):
        os.replace(stage / variant_filename(model, precision), out / variant_filename(model, precision))
    for precision in PRECISIONS:
        stale = out / variant_filename(model, precision)
        if precision not in produced and stale.exists():
            stale.unlink()
            log(f"  removed {stale} (made from the previous {variant_filename(model, 'fp32')}, now replaced)")


def _base_metadata(loaded: LoadedModel, opts: ExportOptions) -> ModelMetadata:
    import onnx
    import onnxruntime
    import torch

    return contract.new_metadata(
        model=loaded.name,
        labels=loaded.labels,
        preprocess=loaded.preprocess,
        original_labels=tuple(loaded.original_labels) if loaded.original_labels else None,
        labels_source=loaded.labels_source,
        weights=loaded.weights,
        untrained=loaded.untrained,
        input_name=ox.INPUT_NAME,
        output_name=ox.OUTPUT_NAME,
        exported={
            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "opset": opts.opset,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "ferry": _ferry_version(),
        },
        # the machine the checks ran on: its instruction set decides which int8 kernels ran
        validated_on={**cpu_info(), "onnxruntime_threads": ox.validation_threads()},
        **({"source": loaded.extra} if loaded.extra else {}),
    )


def _ferry_version() -> str:
    from ferry import __version__

    return __version__
