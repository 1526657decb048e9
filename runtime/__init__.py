"""ferry's deployable runtime: onnxruntime, numpy and pillow only (never torch).

    from ferry.runtime import Classifier
    clf = Classifier.from_onnx("models/resnet50.onnx")

Submodules load on first use (`Classifier`, `Prediction` and `Outcome` are looked up lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["Classifier", "Prediction", "Outcome"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ferry.runtime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'ferry.runtime' has no attribute {name!r}")
