"""FinetuneConfig: the transfer-learning recipe for torchvision classifiers, every option documented
where it is declared (the docs become --help). No torch here: `ferry --help` must not need it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry.core.errors import FerryError
from ferry.train.config import Recipe, _doc


@dataclass(frozen=True)
class FinetuneConfig(Recipe):
    """The defaults are the recommended transfer-learning recipe."""

    arch: str = field(default="resnet18", metadata=_doc("torchvision classification architecture"))
    data_dir: str = field(default="data", metadata=_doc("image folder: DATA/<class>/* or DATA/train/<class> + DATA/val/<class>"))
    out: str = field(default="runs/finetune", metadata=_doc("output folder: checkpoint, metrics.json, curves.png, confusion.png"))
    weights: str = field(default="DEFAULT", metadata=_doc("pretrained weights name (DEFAULT, IMAGENET1K_V1, ...), a state-dict file, or none"))
    image_size: int = field(default=0, metadata=_doc("input crop in pixels (0: the weights' own, e.g. 224); smaller for small images"))
    epochs: int = field(default=8, metadata=_doc("number of training epochs, the frozen warm-up included"))
    frozen_epochs: int = field(default=1, metadata=_doc("first epochs that train only the new head (pretrained weights only)"))
    batch_size: int = field(default=64, metadata=_doc("mini-batch size (shuffled, drop_last)"))
    lr: float = field(default=1e-3, metadata=_doc("peak AdamW learning rate of the head"))
    backbone_lr_factor: float = field(default=0.1, metadata=_doc("backbone learning rate as a fraction of --lr (pretrained weights only)"))
    weight_decay: float = field(default=0.05, metadata=_doc("AdamW weight decay (not on norms and biases)"))
    warmup: float = field(default=0.05, metadata=_doc("fraction of the steps spent warming the lr up"))
    label_smoothing: float = field(default=0.1, metadata=_doc("cross-entropy label smoothing"))
    augment: bool = field(default=True, metadata=_doc("random resized crop and TrivialAugment on training images"))
    hflip: bool = field(default=True, metadata=_doc("random horizontal flips (turn off for text, digits, asymmetric classes)"))
    val_fraction: float = field(default=0.1, metadata=_doc("share of each class held out when there is no val/ folder"))
    train_limit: int = field(default=0, metadata=_doc("use only N training images, a stratified sample (0: all); for quick runs"))
    workers: int = field(default=2, metadata=_doc("data-loading worker processes"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: int = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)"))

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1 (got {self.epochs})")
        if not 0 <= self.frozen_epochs <= self.epochs:
            problems.append(f"--frozen-epochs must be in [0, --epochs] (got {self.frozen_epochs}; = --epochs trains the head only)")
        if self.batch_size < 2:
            problems.append(f"--batch-size must be >= 2 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not 0 < self.backbone_lr_factor <= 1:
            problems.append(f"--backbone-lr-factor must be in (0, 1] (got {self.backbone_lr_factor})")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.warmup < 1:
            problems.append(f"--warmup must be in [0, 1) (got {self.warmup})")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be in (0, 1) (got {self.val_fraction})")
        if self.image_size < 0 or 0 < self.image_size < 16:
            problems.append(f"--image-size must be 0 (the weights' own) or >= 16 (got {self.image_size})")
        for name in ("train_limit", "workers", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        if problems:
            raise FerryError("; ".join(problems))
