"""Any torchvision classification architecture by name, through torchvision's model and weights API
(`list_models`, `get_model`, `get_model_weights`): pretrained weights by name, a local state-dict
file, or none; the classifier head replaced for the user's classes; and the preprocessing spec that
training, export and the runtime share, taken from the weights' own transforms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.core.errors import FerryError
from ferry.core.fileio import sha256_file
from ferry.runtime.presets import imagenet_spec


class WeightsUnavailable(FerryError):
    """Pretrained weights could not be fetched (offline, or the download failed). Exit code 3, so a
    script can tell "no weights here" from every other failure (`make demo` falls back to random
    weights on this one only)."""

    exit_code = 3


@dataclass
class Weights:
    """Where a model's starting weights come from: a torchvision weights enum, a file, or none."""

    source: str  # "IMAGENET1K_V2", "file r50.pth (sha256 ...)" or "none"
    enum: Any = None  # torchvision WeightsEnum member (pretrained by name)
    path: Path | None = None  # a local state dict

    @property
    def pretrained(self) -> bool:
        return self.enum is not None or self.path is not None


def classification_archs() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def check_arch(arch: str) -> None:
    archs = classification_archs()
    if arch not in archs:
        import difflib

        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FerryError(f"unknown architecture {arch!r}{hint}; torchvision's classification models are: {', '.join(archs)}")


def resolve_weights(arch: str, weights: str) -> Weights:
    """`none`, a torchvision weights name of `arch` (IMAGENET1K_V1, DEFAULT, ...) or a file path."""
    import torchvision.models as tvm

    check_arch(arch)
    if weights.lower() == "none":
        return Weights("none")
    enum = tvm.get_model_weights(arch)
    names = list(enum.__members__)
    if weights.upper() in names:
        member = enum[weights.upper()]
        return Weights(member.name if weights.upper() != "DEFAULT" else f"DEFAULT ({member.name})", enum=member)
    path = Path(weights)
    if path.is_file():
        return Weights(f"file {path.name} (sha256 {sha256_file(path)[:16]})", path=path)
    raise FerryError(f"--weights {weights!r} is not a file, nor one of {arch}'s weights: {', '.join(names)}, or none")


def default_transforms(arch: str, weights: Weights):
    """The ImageClassification preset of the weights (or, without weights, of the arch's DEFAULT
    weights: the resolution and normalization the architecture was designed for). No download."""
    import torchvision.models as tvm

    member = weights.enum or tvm.get_model_weights(arch).DEFAULT
    return member.transforms()


def preprocess_spec(arch: str, weights: Weights, image_size: int = 0) -> dict[str, Any]:
    """The metadata spec (resize, crop, interpolation, mean, std); `image_size` overrides the crop
    (for small images) and scales the resize with it."""
    t = default_transforms(arch, weights)
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    if image_size:
        resize, crop = max(image_size, round(image_size * resize / crop)), image_size
    return imagenet_spec(resize=resize, crop=crop, interpolation=t.interpolation.value,
                         mean=tuple(t.mean), std=tuple(t.std))


IMAGENET_CLASSES = 1000
SIMPLE_LABELS_SOURCE = "imagenet-simple-labels (github.com/anishathalye/imagenet-simple-labels, public domain)"


def torchvision_categories(arch: str, weights: Weights) -> list[str]:
    """The class names torchvision gives the weights (or, without weights, the arch's DEFAULT weights)."""
    import torchvision.models as tvm

    member = weights.enum or tvm.get_model_weights(arch).DEFAULT
    return list(member.meta["categories"])


def simple_imagenet_labels() -> list[str]:
    """ImageNet-1k's 1,000 classes named as people say them (imagenet-simple-labels: class 268 is
    "Mexican hairless dog" where torchvision says "Mexican hairless"), shipped with ferry."""
    import json
    from importlib import resources

    labels = json.loads(resources.files("ferry.models").joinpath("imagenet_simple_labels.json").read_text("utf-8"))
    if len(labels) != IMAGENET_CLASSES:
        raise FerryError(f"ferry's imagenet_simple_labels.json holds {len(labels)} names, not {IMAGENET_CLASSES}")
    return labels


def display_labels(categories: list[str]) -> tuple[list[str], list[str] | None, str]:
    """(labels to show, the originals when replaced, where the shown ones come from): ImageNet-1k's
    torchvision names become imagenet-simple-labels' names; any other class list is kept."""
    if len(categories) == IMAGENET_CLASSES:
        return simple_imagenet_labels(), categories, SIMPLE_LABELS_SOURCE
    return categories, None, ""


def create(arch: str, weights: Weights, *, num_classes: int | None = None) -> tuple[Any, str | None]:
    """Build `arch` with `weights`; with `num_classes`, replace its classifier head (new, randomly
    initialised layer). Returns (module, the head's dotted name or None)."""
    import torch
    import torchvision.models as tvm

    try:
        model = tvm.get_model(arch, weights=weights.enum)
    except OSError as exc:  # URLError, socket and SSL errors: the weights could not be fetched
        url = weights.enum.url
        raise WeightsUnavailable(
            f"could not get {arch} weights {weights.enum.name} ({url}): {type(exc).__name__}: {str(exc)[:120]}. Offline? "
            f"Download {Path(url).name} elsewhere and pass --weights /path/to/{Path(url).name} (or put it in "
            f"{torch.hub.get_dir()}/checkpoints/), or use --weights none"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt cached file, a hash mismatch: not "offline"
        raise FerryError(f"could not load {arch} weights {weights.source}: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if weights.path is not None:
        state = load_state_dict(weights.path)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise FerryError(f"{weights.path} is not a {arch} state dict: {str(exc).splitlines()[0][:200]}") from exc
    head = None
    if num_classes is not None:
        head = replace_head(model, num_classes)
    return model.eval(), head


def replace_head(model, num_classes: int) -> str:
    """Replace the last Linear layer (or the final 1x1 Conv of SqueezeNet) with a fresh one of
    `num_classes` outputs; return its dotted name. Inception/GoogLeNet auxiliary heads are dropped."""
    from torch import nn

    for aux in ("AuxLogits", "aux1", "aux2"):
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
            if hasattr(model, "aux_logits"):
                model.aux_logits = False
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                                              and name.startswith("classifier")):
            last = (name, module)
    if last is None:
        raise FerryError(f"{type(model).__name__}: no Linear classifier layer found to replace")
    name, old = last
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return name


def load_state_dict(path: Path) -> dict:
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
