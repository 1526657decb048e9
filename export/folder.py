"""Images for exporting a fine-tuned classifier, from the folder it was trained on: its held-out
split exactly as the checkpoint recorded it (every export is checked on all of it), and a seeded
sample of its training images to calibrate int8. Read with the shared reader
(`ferry.runtime.inputs`): a file that cannot be read is skipped and named, as training skipped it,
so a folder that trains also exports. Preprocessed by the runtime's own code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.export.evalset import EvalSet, ExportData
from ferry.runtime.inputs import describe_skipped, from_checkpoint, read_images
from ferry.runtime.presets import Preprocess, preprocess


def load_folder_for_export(root: str | Path, state: dict[str, Any], spec: Preprocess, *, calib_images: int, seed: int = 0,
                           log: Callable[[str], None] = print) -> ExportData:
    data = from_checkpoint(root, state["classes"], [tuple(v) for v in state["data"]["val_files"]])

    def prepare(img) -> np.ndarray:
        return preprocess(img, spec)

    val_arrays, val_kept, val_skipped = read_images([data.root / s.path for s in data.val], prepare, root=data.root)
    if not val_arrays:
        raise FerryError(f"none of the {len(data.val)} held-out images of the checkpoint can be read in {data.root}"
                         + (f"; {describe_skipped(val_skipped, limit=3)}" if val_skipped else ""))
    # calibration: a seeded sample of the training files; unreadable ones are skipped, not replaced
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(data.train), size=min(calib_images, len(data.train)), replace=False)) if data.train else []
    calib, _, calib_skipped = read_images([data.root / data.train[i].path for i in pick], prepare, root=data.root)
    skipped = val_skipped + calib_skipped
    notes = [f"{describe_skipped(skipped)} in {data.root}"] if skipped else []
    if not calib:
        notes.append(f"no training images found in {data.root} to calibrate int8 on")
    log(f"  checking on {len(val_arrays)} held-out images of {data.root}; int8 calibration on {len(calib)} training images")
    return ExportData(
        calibration=np.stack(calib) if calib else None,
        evaluation=EvalSet(f"the {len(val_arrays)} held-out images of {data.root.name}", np.stack(val_arrays),
                           np.array([data.val[i].label for i in val_kept], dtype=np.int64)),
        notes=notes,
    )
