"""MNIST data for exporting the digit CNN: the 10,000-image check and int8 calibration.

Images go through the runtime's own preprocessing (`runtime.presets`), as in deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.export import onnx_export as ox
from ferry.runtime.presets import mnist_spec, preprocess_mnist


@dataclass
class MnistEval:
    test_x: np.ndarray  # (N, 1, 28, 28) float32, preprocessed
    test_y: np.ndarray  # (N,) int64
    calib_x: np.ndarray  # (M, 1, 28, 28) float32, from the training images


def prepare_digits(images_uint8: np.ndarray) -> np.ndarray:
    spec = mnist_spec()
    return np.stack([preprocess_mnist(img.astype(np.float32) / 255.0, spec) for img in images_uint8])


def load_mnist_for_export(data_dir: str | Path, *, calib_images: int, seed: int = 0) -> MnistEval:
    from ferry.train.data import load_mnist_arrays

    train_x, _, test_x, test_y = load_mnist_arrays(data_dir)
    idx = np.random.default_rng(seed).choice(train_x.shape[0], size=min(calib_images, train_x.shape[0]), replace=False)
    return MnistEval(
        test_x=prepare_digits(test_x.numpy()),
        test_y=test_y.numpy(),
        calib_x=prepare_digits(train_x.numpy()[np.sort(idx)]),
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def check_on_mnist(path: str | Path, model, mnist: MnistEval) -> dict[str, Any]:
    """fp32 export vs PyTorch on the whole test set: top-1 identical on every image."""
    ours = ox.run_batched(ox.cpu_session(path), mnist.test_x)
    ref = ox.torch_logits(model, mnist.test_x)
    differing = int((ours.argmax(1) != ref.argmax(1)).sum())
    if differing:
        raise ox.PredictionMismatch(f"top-1 differs from PyTorch on {differing} of {len(ref)} MNIST test images")
    return {
        "images": int(len(ref)),
        "onnx_accuracy": accuracy(ours, mnist.test_y),
        "torch_accuracy": accuracy(ref, mnist.test_y),
        "top1_identical": True,
        "max_abs_diff": float(np.abs(ours - ref).max()),
    }
