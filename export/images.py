"""Calibration images for ResNet-50 int8: a folder of images, preprocessed like deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferry.core.errors import FerryError
from ferry.runtime.presets import preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_calibration_images(folder: str | Path, spec: dict[str, Any], *, limit: int = 500) -> np.ndarray:
    folder = Path(folder)
    if not folder.is_dir():
        raise FerryError(f"--calib-dir {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    arrays, bad = [], []
    for p in files:
        try:
            with Image.open(p) as img:
                img.load()
                arrays.append(preprocess(img, spec))
        except Exception as exc:  # noqa: BLE001 - a bad image is skipped and named
            bad.append(f"{p.name} ({type(exc).__name__})")
    if not arrays:
        detail = f"; unreadable: {', '.join(bad[:5])}" if bad else ""
        raise FerryError(f"--calib-dir {folder} holds no usable images ({', '.join(sorted(IMAGE_SUFFIXES))}){detail}")
    return np.stack(arrays)
