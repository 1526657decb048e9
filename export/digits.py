"""MNIST data for exporting the digit CNN: the 10,000 test images every export is checked on, and
1,000 training images (never test images) to calibrate int8. Images go through the runtime's own
preprocessing (`ferry.runtime.presets`), as in deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.idx import missing_mnist_files, read_mnist
from ferry.export.evalset import EvalSet, ExportData
from ferry.runtime.presets import mnist_spec, preprocess_mnist


def prepare_digits(images_uint8: np.ndarray) -> np.ndarray:
    spec = mnist_spec()
    return np.stack([preprocess_mnist(img.astype(np.float32) / 255.0, spec) for img in images_uint8])


def load_mnist_for_export(data_dir: str | Path, *, calib_images: int, seed: int = 0) -> ExportData:
    missing = missing_mnist_files(data_dir)
    if missing:
        raise FerryError(f"MNIST not found in {data_dir}/MNIST/raw: missing {', '.join(missing)}; point --data-dir at "
                         "the folder `ferry train` read (it holds MNIST/raw/*-ubyte)")
    train_x, _ = read_mnist(data_dir, "train")
    test_x, test_y = read_mnist(data_dir, "t10k")
    idx = np.random.default_rng(seed).choice(train_x.shape[0], size=min(calib_images, train_x.shape[0]), replace=False)
    return ExportData(
        calibration=prepare_digits(train_x[np.sort(idx)]),
        evaluation=EvalSet(f"MNIST test ({len(test_y)} images)", prepare_digits(test_x), test_y),
        notes=[],
    )
