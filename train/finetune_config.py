"""FinetuneConfig: the transfer-learning recipe for torchvision classifiers, every option documented
where it is declared (the docs become --help). No torch here: `ferry --help` must not need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Ge, Gt, Interval

from ferry.train.config import Recipe, _doc


@dataclass(frozen=True)
class FinetuneConfig(Recipe):
    """The defaults are the recommended transfer-learning recipe."""

    arch: str = field(default="resnet18", metadata=_doc("torchvision classification architecture"))
    data_dir: str = field(default="data", metadata=_doc("image folder: DATA/<class>/* or DATA/train/<class> + DATA/val/<class>"))
    out: str = field(default="runs/finetune", metadata=_doc("output folder: checkpoint, metrics.json, curves.png, confusion.png"))
    weights: str = field(default="DEFAULT", metadata=_doc("pretrained weights name (DEFAULT, IMAGENET1K_V1, ...), a state-dict file, or none"))
    image_size: int = field(default=0, metadata=_doc("input crop in pixels (0: the weights' own, e.g. 224); smaller for small images"))
    epochs: Annotated[int, Ge(1)] = field(default=8, metadata=_doc("number of training epochs, the frozen warm-up included"))
    frozen_epochs: int = field(default=1, metadata=_doc("first epochs that train only the new head (pretrained weights only)"))
    batch_size: Annotated[int, Ge(2)] = field(default=64, metadata=_doc("mini-batch size (shuffled, drop_last)"))
    lr: Annotated[float, Gt(0)] = field(default=1e-3, metadata=_doc("peak AdamW learning rate of the head"))
    backbone_lr_factor: Annotated[float, Interval(gt=0, le=1)] = field(default=0.1, metadata=_doc("backbone learning rate as a fraction of --lr (pretrained weights only)"))
    weight_decay: Annotated[float, Ge(0)] = field(default=0.05, metadata=_doc("AdamW weight decay (not on norms and biases)"))
    warmup: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.05, metadata=_doc("fraction of the steps spent warming the lr up"))
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.1, metadata=_doc("cross-entropy label smoothing"))
    augment: bool = field(default=True, metadata=_doc("random resized crop and TrivialAugment on training images"))
    hflip: bool = field(default=True, metadata=_doc("random horizontal flips (turn off for text, digits, asymmetric classes)"))
    val_fraction: Annotated[float, Interval(gt=0, lt=1)] = field(default=0.1, metadata=_doc("share of each class held out when there is no val/ folder"))
    train_limit: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("use only N training images, a stratified sample (0: all); for quick runs"))
    workers: Annotated[int, Ge(0)] = field(default=2, metadata=_doc("data-loading worker processes"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)"))

    def other_problems(self) -> list[str]:
        problems = []
        if not 0 <= self.frozen_epochs <= self.epochs:
            problems.append(f"--frozen-epochs must be in [0, --epochs] (got {self.frozen_epochs}; = --epochs trains the head only)")
        if self.image_size < 0 or 0 < self.image_size < 16:
            problems.append(f"--image-size must be 0 (the weights' own) or >= 16 (got {self.image_size})")
        return problems
