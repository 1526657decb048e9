"""Images an export is checked on, preprocessed by the runtime's own code: a held-out set with labels
(accuracy, gated) or without (top-1 agreement with fp32 only), and the calibration images for int8."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.export import onnx_export as ox


@dataclass
class EvalSet:
    """Preprocessed (N, C, H, W) float32 images; `labels` (N,) int64 or None when unlabelled."""

    name: str  # e.g. "MNIST test (10000 images)"
    x: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class ExportData:
    """What an export needs besides the model: int8 calibration images and the images every export
    (fp32 against PyTorch, variants against fp32) is checked on. The two never overlap."""

    calibration: np.ndarray | None
    evaluation: EvalSet | None
    notes: list[str]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def check_top1_against_torch(path: str | Path, model, evalset: EvalSet) -> dict[str, Any]:
    """fp32 export vs PyTorch on every image of the set: the top-1 prediction must be identical."""
    ours = ox.run_batched(ox.cpu_session(path), evalset.x)
    ref = ox.torch_logits(model, evalset.x)
    differing = int((ours.argmax(1) != ref.argmax(1)).sum())
    if differing:
        raise ox.PredictionMismatch(f"top-1 differs from PyTorch on {differing} of {len(ref)} images of {evalset.name}")
    out: dict[str, Any] = {"dataset": evalset.name, "images": int(len(ref)), "top1_identical": True,
                           "max_abs_diff": float(np.abs(ours - ref).max())}
    if evalset.labels is not None:
        out.update(onnx_accuracy=accuracy(ours, evalset.labels), torch_accuracy=accuracy(ref, evalset.labels))
    return out


def compare_variant(variant_session, reference_session, evalset: EvalSet) -> dict[str, Any]:
    """A variant against its fp32 model on the same held-out images: accuracy and drop when
    labelled, top-1 agreement and the largest logit difference always."""
    ours = ox.run_batched(variant_session, evalset.x, 64)
    ref = ox.run_batched(reference_session, evalset.x, 64)
    out: dict[str, Any] = {"dataset": evalset.name, "images": int(len(ref)),
                           "top1_agreement": float((ours.argmax(1) == ref.argmax(1)).mean()),
                           "max_abs_logit_diff": float(np.abs(ours - ref).max())}
    if evalset.labels is not None:
        acc, acc_ref = accuracy(ours, evalset.labels), accuracy(ref, evalset.labels)
        out.update(accuracy=acc, fp32_accuracy=acc_ref, drop_pp=round(100 * (acc_ref - acc), 4))
    return out
