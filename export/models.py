"""The exportable models: the trained digit CNN (a ferry checkpoint), any torchvision classifier by
name (ImageNet weights through torchvision's weights API, a local state-dict file, or none), and a
torchvision classifier fine-tuned by `ferry train --arch ARCH` (its self-describing checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.core.fileio import sha256_file
from ferry.models.tvmodels import WeightsUnavailable  # noqa: F401 - re-exported: the export stage raises it
from ferry.runtime.presets import MNIST_LABELS, Preprocess, mnist_spec

CNN = "mnist-cnn"


@dataclass
class LoadedModel:
    name: str
    module: Any  # torch.nn.Module in eval mode
    labels: list[str]
    preprocess: Preprocess
    weights: str
    untrained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # "source" in the metadata: arch, classes, training config
    original_labels: list[str] | None = None  # the source's own class names, when `labels` replaced them
    labels_source: str = ""


def load_mnist_cnn(checkpoint: str | Path) -> LoadedModel:
    import torch

    from ferry.core.errors import FerryError
    from ferry.models.checkpoint import digit_cnn_from_state, load_digit_cnn_state

    state = load_digit_cnn_state(checkpoint)  # read once: the weights and the epoch named in the metadata
    trained = digit_cnn_from_state(state, checkpoint)
    model = trained.inference_order()  # the same function in the layout onnxruntime fuses (DigitCNN.inference_order)
    if model is not trained:
        probe = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if not torch.allclose(model(probe), trained(probe), atol=1e-5, rtol=1e-5):
                raise FerryError(f"{checkpoint}: the inference layer order does not compute what was trained")
    order = " -> ".join(type(m).__name__ for m in model.features[: len(model.features) // 3])  # one conv layer's
    return LoadedModel(
        name=CNN,
        module=model,
        labels=list(MNIST_LABELS),
        preprocess=mnist_spec(),
        weights=f"checkpoint {Path(checkpoint).name} (epoch {state['epoch']}, sha256 {sha256_file(checkpoint)[:16]})",
        extra={"arch": CNN, "architecture": model.architecture(), "layer_order": order,
               "train_config": dict(state["config"])},
    )


def load_torchvision(arch: str, weights: str, *, name: str | None = None) -> LoadedModel:
    """A torchvision classifier with its 1,000 ImageNet classes: pretrained weights by name
    (downloaded by torchvision, or found in its cache), a state-dict file, or none (seeded random
    weights, stamped untrained)."""
    import torch

    from ferry.models import tvmodels

    w = tvmodels.resolve_weights(arch, weights)
    torch.manual_seed(0)
    model, _ = tvmodels.create(arch, w)
    labels, original, source = tvmodels.display_labels(tvmodels.torchvision_categories(arch, w))
    extra: dict[str, Any] = {"arch": arch, "num_classes": len(labels)}
    if w.enum is not None:
        extra["reported_imagenet_acc"] = w.enum.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return LoadedModel(name or arch, model, labels, tvmodels.preprocess_spec(arch, w), weights=w.source,
                       untrained=not w.pretrained, extra=extra, original_labels=original, labels_source=source)


def load_finetuned(checkpoint: str | Path, *, arch: str | None = None, name: str | None = None) -> tuple[LoadedModel, dict]:
    """A classifier fine-tuned by `ferry train --arch ARCH`; returns it and the checkpoint's state."""
    from ferry.core.errors import FerryError
    from ferry.models.checkpoint import classifier_from_state, load_classifier_state

    state = load_classifier_state(checkpoint)
    model = classifier_from_state(state, checkpoint)
    if arch is not None and arch != state["arch"]:
        raise FerryError(f"{checkpoint} holds a fine-tuned {state['arch']}, not {arch}: run `ferry export {state['arch']} "
                         f"--checkpoint {checkpoint} ...`")
    cfg = state["config"]
    loaded = LoadedModel(
        name=name or state["arch"],
        module=model,
        labels=list(state["classes"]),
        preprocess=_spec(state["preprocess"], checkpoint),
        weights=f"checkpoint {Path(checkpoint).name} (epoch {state['epoch']}, sha256 {sha256_file(checkpoint)[:16]}), "
                f"fine-tuned from {state.get('weights_source', '?')}",
        extra={"arch": state["arch"], "num_classes": len(state["classes"]), "fine_tuned": True,
               "data": {"root": state["data"]["root"], "val_source": state["data"]["val_source"]},
               "train_config": cfg, "head": state["head"]},
    )
    return loaded, state


def _spec(raw: Any, checkpoint: str | Path) -> Preprocess:
    from ferry.core.errors import FerryError
    from ferry.runtime.presets import SpecError

    try:
        return Preprocess.from_dict(raw)
    except SpecError as exc:
        raise FerryError(f"checkpoint {checkpoint}: {exc}") from exc
