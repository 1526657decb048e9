"""ferry's deployable runtime: onnxruntime, numpy and pillow only (never torch).

    from ferry.runtime import Classifier, Detector, open_model
    clf = Classifier.from_onnx("models/resnet50.onnx")
    det = Detector.from_onnx("models/digits.onnx")
    model = open_model(path)              # whichever the file's metadata says it is

Submodules load on first use (the names below are looked up lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["Classifier", "Prediction", "Outcome", "Detector", "Detections", "Detection", "DetectOutcome", "open_model"]
_DETECTOR = {"Detector", "Detections", "Detection", "DetectOutcome", "open_model"}


def __getattr__(name: str) -> Any:
    if name in _DETECTOR:
        from ferry.runtime import detector

        return getattr(detector, name)
    if name in __all__:
        from ferry.runtime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'ferry.runtime' has no attribute {name!r}")
