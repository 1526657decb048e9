"""The two exportable models: the trained digit CNN (from a ferry checkpoint) and torchvision's
ResNet-50 (ImageNet weights through torchvision's weights API, a local file, or none)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ferry.core.errors import FerryError
from ferry.runtime.presets import MNIST_LABELS, imagenet_spec, mnist_spec

MODELS = ("mnist-cnn", "resnet50")
RESNET_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2", "none")


@dataclass
class LoadedModel:
    name: str
    module: Any  # torch.nn.Module in eval mode
    labels: list[str]
    preprocess: dict[str, Any]
    weights: str
    untrained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def bundled_imagenet_labels() -> list[str]:
    text = resources.files("ferry.export").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = [ln for ln in text.splitlines() if ln]
    assert len(labels) == 1000
    return labels


def load_mnist_cnn(checkpoint: str | Path) -> LoadedModel:
    from ferry.train.trainer import load_checkpoint, load_model

    model, cfg = load_model(checkpoint)
    state = load_checkpoint(checkpoint)
    return LoadedModel(
        name="mnist-cnn",
        module=model,
        labels=list(MNIST_LABELS),
        preprocess=mnist_spec(),
        weights=f"checkpoint {Path(checkpoint).name} (epoch {state['epoch']}, sha256 {_sha256(checkpoint)[:16]})",
        extra={"architecture": f"DigitCNN{list(cfg.channels)}", "train_config": cfg.to_dict()},
    )


def load_resnet50(weights: str) -> LoadedModel:
    """weights: IMAGENET1K_V1, IMAGENET1K_V2 (downloaded by torchvision, or found in its cache),
    none (random weights, stamped untrained) or the path of a saved state dict."""
    from torchvision.models import ResNet50_Weights, resnet50

    if weights.lower() == "none":
        import torch

        torch.manual_seed(0)
        return LoadedModel("resnet50", resnet50(weights=None).eval(), bundled_imagenet_labels(), imagenet_spec(),
                           weights="none", untrained=True)
    if weights.upper() in ResNet50_Weights.__members__:
        w = ResNet50_Weights[weights.upper()]
        try:
            model = resnet50(weights=w)
        except Exception as exc:  # noqa: BLE001 - urllib/http/ssl errors when offline
            file = Path(w.url).name
            raise FerryError(
                f"could not get ResNet-50 weights {w.name} ({w.url}): {type(exc).__name__}: {str(exc)[:120]}. "
                f"Offline? Download {file} elsewhere and pass --weights /path/to/{file}, or use --weights none"
            ) from exc
        t = w.transforms()
        spec = imagenet_spec(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), interpolation=t.interpolation.value)
        return LoadedModel("resnet50", model.eval(), list(w.meta["categories"]), spec, weights=w.name,
                           extra={"reported_imagenet_acc": w.meta.get("_metrics", {}).get("ImageNet-1K", {})})
    path = Path(weights)
    if not path.exists():
        raise FerryError(f"--weights {weights!r}: not a file, and not one of {', '.join(RESNET_WEIGHTS)}")
    model = resnet50(weights=None)
    state = _load_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FerryError(f"{path} is not a ResNet-50 state dict: {str(exc).splitlines()[0][:200]}") from exc
    return LoadedModel("resnet50", model.eval(), bundled_imagenet_labels(), imagenet_spec(),
                       weights=f"file {path.name} (sha256 {_sha256(path)[:16]})")


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FerryError(f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FerryError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
