"""TrainConfig: every training option, documented where it is declared (the docs become --help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ferry.core.errors import FerryError


def _doc(text: str):
    return {"help": text}


class Recipe:
    """What the training configs share: dict round trips (checkpoints store the config as plain
    data) and the recipe key that --resume compares."""

    NOT_RECIPE = ("out", "device", "threads", "data_dir", "workers")  # where and how, not what

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items() if k in fields})

    def recipe_key(self) -> dict:
        """The fields that must match for --resume to continue a run."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_RECIPE}


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The default values are the recommended recipe (README: "Training recipe")."""

    data_dir: str = field(default="data", metadata=_doc("folder holding MNIST/raw/*-ubyte (torchvision layout)"))
    out: str = field(default="runs/mnist-cnn", metadata=_doc("output folder: checkpoint, metrics.json, curves.png"))
    epochs: int = field(default=8, metadata=_doc("number of training epochs"))
    batch_size: int = field(default=64, metadata=_doc("mini-batch size (shuffled, drop_last)"))
    lr: float = field(default=0.05, metadata=_doc("peak learning rate of the one-cycle schedule (SGD)"))
    momentum: float = field(default=0.9, metadata=_doc("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_doc("L2 weight decay (not on batch-norm and bias)"))
    warmup: float = field(default=0.15, metadata=_doc("fraction of the steps spent warming the lr up"))
    label_smoothing: float = field(default=0.0, metadata=_doc("cross-entropy label smoothing"))
    augment: bool = field(default=True, metadata=_doc("random small shifts/rotations/scales of training images"))
    redraw: float = field(default=0.3, metadata=_doc("with --augment: share of images redrawn along their skeleton with a constant-width pen"))
    stroke_jitter: float = field(default=0.0, metadata=_doc("with --augment: share of images whose strokes are thickened or thinned"))
    elastic: float = field(default=0.0, metadata=_doc("with --augment: elastic distortion in pixels (0: none)"))
    channels: tuple[int, int, int] = field(default=(32, 64, 128), metadata=_doc("widths of the 3 conv layers"))
    dropout: float = field(default=0.25, metadata=_doc("dropout before the classifier"))
    val_size: int = field(default=5000, metadata=_doc("training images held out for validation"))
    train_limit: int = field(default=0, metadata=_doc("use only the first N training images (0: all); for quick runs"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: int = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)"))

    def validate(self) -> None:
        """Raise one FerryError listing every nonsensical value."""
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not 0 <= self.momentum < 1:
            problems.append(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.warmup < 1:
            problems.append(f"--warmup must be in [0, 1) (got {self.warmup})")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.redraw <= 1:
            problems.append(f"--redraw must be in [0, 1] (got {self.redraw})")
        if not 0 <= self.stroke_jitter <= 1:
            problems.append(f"--stroke-jitter must be in [0, 1] (got {self.stroke_jitter})")
        if not 0 <= self.elastic <= 5:
            problems.append(f"--elastic must be in [0, 5] pixels (got {self.elastic})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.val_size < 0:
            problems.append(f"--val-size must be >= 0 (got {self.val_size})")
        if self.train_limit < 0:
            problems.append(f"--train-limit must be >= 0 (got {self.train_limit})")
        if self.threads < 0:
            problems.append(f"--threads must be >= 0 (got {self.threads})")
        if len(self.channels) != 3 or min(self.channels) < 1:
            problems.append(f"--channels must be 3 positive widths (got {list(self.channels)})")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        if problems:
            raise FerryError("; ".join(problems))
