"""The checkpoint formats of both trainers, owned here and used by `ferry train` (writes them) and
`ferry export` (reads them): written atomically (a kill never leaves a torn file) and loaded safely
(`weights_only=True`: plain tensors and containers, no code), each problem a FerryError.

- `DIGIT_CNN_FORMAT`: the digit CNN (`ferry train`): weights, optimizer, training config, epoch, history.
- `CLASSIFIER_FORMAT`: a fine-tuned torchvision classifier (`ferry train --arch`): also the
  architecture, classes, preprocessing, head, weights source and the held-out files.
- `DETECTOR_FORMAT`: a detector (`ferry train --task detect`): the architecture, categories (with
  their COCO ids), preprocessing, post-processing, weights source, and its data (the annotation
  files and the validation image ids).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path, check_input_file


def save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({**state, "torch_version": str(torch.__version__)}, tmp)


def load(path: str | Path, *, fmt: str, kind: str, required: Sequence[str]) -> dict[str, Any]:
    """The checkpoint at `path`, which must be of format `fmt` and hold `required` keys."""
    path = Path(path)
    check_input_file(path, "checkpoint", "checkpoint file (checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text would suggest weights_only=False: never for a file of unknown origin
        raise FerryError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint of weights ({type(exc).__name__}); "
                         f"ferry loads weights only and never runs code from a checkpoint") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise FerryError(f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}" + (f": {first}" if first else "")) from exc
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found != fmt and found.split("/")[0] == fmt.split("/")[0]:
        raise FerryError(f"{path} was written by another version of ferry (format {found}; this one reads {fmt}, "
                         f"whose model differs): train it again with `ferry train`")
    if found != fmt:
        raise FerryError(f"{path} is not a ferry {kind} checkpoint (format {fmt} expected)")
    missing = [k for k in required if k not in state]
    if missing:
        raise FerryError(f"checkpoint {path} is incomplete: no {missing[0]!r}")
    return state


DIGIT_CNN_FORMAT = "ferry.mnist-cnn/2"  # /2: pooling before BatchNorm (ferry.models.digit_cnn)
DIGIT_CNN_KEYS = ("model", "config", "epoch", "history")
CLASSIFIER_FORMAT = "ferry.classifier/1"
CLASSIFIER_KEYS = ("arch", "classes", "preprocess", "head", "model", "config", "data", "epoch", "history")


def load_digit_cnn_state(path: str | Path) -> dict[str, Any]:
    """A digit-CNN checkpoint (`ferry train`), checked."""
    return load(path, fmt=DIGIT_CNN_FORMAT, kind="mnist-cnn", required=DIGIT_CNN_KEYS)


def digit_cnn_from_state(state: dict[str, Any], path: str | Path):
    """The trained DigitCNN (eval mode) of a loaded digit-CNN checkpoint (`path` names it in errors)."""
    from ferry.models.digit_cnn import DigitCNN

    model = DigitCNN.from_config(state["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise FerryError(f"checkpoint {path} does not match {model.architecture()}: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def load_classifier_state(path: str | Path) -> dict[str, Any]:
    """A fine-tuned classifier's checkpoint (`ferry train --arch`), checked."""
    return load(path, fmt=CLASSIFIER_FORMAT, kind="fine-tuned classifier", required=CLASSIFIER_KEYS)


def classifier_from_state(state: dict[str, Any], path: str | Path):
    """The fine-tuned model (eval mode): the architecture built empty (no weights download) and the
    checkpoint's weights loaded into it."""
    from ferry.models import tvmodels

    model, _ = tvmodels.create(state["arch"], tvmodels.Weights("none"), num_classes=len(state["classes"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise FerryError(f"checkpoint {path} does not match {state['arch']}: {str(exc).splitlines()[0][:200]}") from exc
    return model.eval()


DETECTOR_FORMAT = "ferry.detector/1"
DETECTOR_KEYS = ("arch", "categories", "preprocess", "postprocess", "model", "config", "data", "epoch", "history")


def load_detector_state(path: str | Path) -> dict[str, Any]:
    """A detector's checkpoint (`ferry train --task detect`), checked."""
    return load(path, fmt=DETECTOR_FORMAT, kind="detector", required=DETECTOR_KEYS)


def detector_from_state(state: dict[str, Any], path: str | Path):
    """(the trained detector in its training form, eval mode; its inference form, ready to export):
    the architecture built empty (no weights download) and the checkpoint's weights loaded into it."""
    from ferry.models import detectors, tvmodels
    from ferry.runtime.presets import Preprocess, SpecError

    try:
        spec = Preprocess.from_dict(state["preprocess"])
    except SpecError as exc:
        raise FerryError(f"checkpoint {path}: {exc}") from exc
    small = detectors.SmallConfig.from_dict(state["small"]) if state.get("small") else None
    model, _ = detectors.build(state["arch"], len(state["categories"]), tvmodels.Weights("none"), image_size=spec.size[0],
                               mean=spec.mean, std=spec.std, small=small)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise FerryError(f"checkpoint {path} does not match {state['arch']}: {str(exc).splitlines()[0][:200]}") from exc
    post = detectors.PostProcess(**state["postprocess"])
    return model.eval(), detectors.InferenceDetector(model, state["arch"], spec.size, post)
