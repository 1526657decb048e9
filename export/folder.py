"""Images for exporting a fine-tuned classifier, from the folder it was trained on: its held-out
split exactly as the checkpoint recorded it (every export is checked on all of it), and a seeded
sample of its training images to calibrate int8. Preprocessed by the runtime's own code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferry.export.evalset import EvalSet, ExportData
from ferry.runtime.images import load_image
from ferry.runtime.presets import preprocess


def load_folder_for_export(root: str | Path, state: dict[str, Any], *, calib_images: int, seed: int = 0,
                           log: Callable[[str], None] = print) -> ExportData:
    from ferry.train.imagefolder import from_checkpoint

    data = from_checkpoint(root, state["classes"], [tuple(v) for v in state["data"]["val_files"]])
    spec = state["preprocess"]

    def prepare(samples) -> np.ndarray:
        return np.stack([preprocess(load_image(data.root / s.path), spec) for s in samples])

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(data.train), size=min(calib_images, len(data.train)), replace=False)) if data.train else []
    log(f"  checking on {len(data.val)} held-out images of {data.root}; int8 calibration on {len(pick)} training images")
    return ExportData(
        calibration=prepare([data.train[i] for i in pick]) if pick else None,
        evaluation=EvalSet(f"the {len(data.val)} held-out images of {data.root.name}", prepare(data.val),
                           np.array([s.label for s in data.val], dtype=np.int64)),
        notes=[] if pick else [f"no training images found in {data.root} to calibrate int8 on"],
    )
