"""Calibration images for int8 from a folder (`--calib-dir`), preprocessed like deployment. One image
in five (at least one, given two) is held out: the int8 model's agreement with fp32 is measured on
images it was not calibrated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferry.core.errors import FerryError
from ferry.export.evalset import EvalSet, ExportData
from ferry.runtime.inputs import describe_skipped, list_files, read_images
from ferry.runtime.presets import Preprocess, preprocess

RECOMMENDED_CALIBRATION_IMAGES = 100
HOLDOUT_EVERY = 5  # every 5th image (sorted by path) is held out for the agreement check


def load_calibration_folder(folder: str | Path, spec: Preprocess, *, limit: int = 1000) -> ExportData:
    folder = Path(folder)
    if not folder.is_dir():
        raise FerryError(f"--calib-dir {folder} is not a folder")
    arrays, _, skipped = read_images(list_files(folder)[:limit], lambda img: preprocess(img, spec), root=folder)
    if not arrays:
        detail = f"; {describe_skipped(skipped, limit=3)}" if skipped else ""
        raise FerryError(f"--calib-dir {folder} holds no usable images{detail}")
    x = np.stack(arrays)
    idx = np.arange(len(x))
    if len(x) >= HOLDOUT_EVERY:
        held = idx % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    else:  # a handful of images: still keep one out of calibration, if there are two
        held = idx == len(x) - 1 if len(x) >= 2 else np.zeros(len(x), bool)
    calib, holdout = x[~held], x[held]
    notes = []
    if skipped:
        notes.append(f"{describe_skipped(skipped)} in {folder}")
    if len(calib) < RECOMMENDED_CALIBRATION_IMAGES:
        notes.append(f"only {len(calib)} calibration image(s) from {folder}: int8 scales from so few images may not "
                     f"fit real inputs; give --calib-dir a few hundred images like those the model will see "
                     f"(at least {RECOMMENDED_CALIBRATION_IMAGES})")
    evaluation = EvalSet(f"{len(holdout)} held-out --calib-dir images (not used for calibration)", holdout) if len(holdout) else None
    if evaluation is None:
        notes.append("no --calib-dir image left to measure int8 agreement on (one image in five is held out)")
    return ExportData(calibration=calib, evaluation=evaluation, notes=notes)
