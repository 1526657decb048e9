"""TrainConfig: every training option, documented where it is declared (the docs become --help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ferry.core.errors import FerryError


def _doc(text: str, *, valid: str | None = None):
    """A field's --help text and, optionally, its valid range, checked by Recipe.validate: ">= 1",
    "> 0", or an interval such as "[0, 1)" (square: bound included; round: excluded)."""
    return {"help": text, "valid": valid} if valid else {"help": text}


def _is_valid(value: float, valid: str) -> bool:
    if valid.startswith((">=", ">")):
        bound = float(valid.lstrip(">= "))
        return value >= bound if valid.startswith(">=") else value > bound
    lo, hi = (float(v) for v in valid[1:-1].split(","))
    return (lo <= value if valid[0] == "[" else lo < value) and (value <= hi if valid[-1] == "]" else value < hi)


class Recipe:
    """What the training configs share: validation of the declared ranges, dict round trips
    (checkpoints store the config as plain data) and the recipe key that --resume compares."""

    NOT_RECIPE = ("out", "device", "threads", "data_dir", "workers")  # where and how, not what
    ABSENT_MEANS: dict = {}  # fields added later: the value a saved config without them was trained with

    def validate(self) -> None:
        """Raise one FerryError listing every nonsensical value."""
        problems = []
        for f in dataclasses.fields(self):
            valid, value = f.metadata.get("valid"), getattr(self, f.name)
            if valid and not _is_valid(value, valid):
                problems.append(f"--{f.name.replace('_', '-')} must be {'' if valid[0] == '>' else 'in '}{valid} (got {value})")
        problems += self.other_problems()
        if getattr(self, "device", "auto") not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be one of auto, cpu, cuda (got {self.device!r})")
        if problems:
            raise FerryError("; ".join(problems))

    def other_problems(self) -> list[str]:
        """Checks a range cannot say (a config adds its own)."""
        return []

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = {**cls.ABSENT_MEANS, **d}
        return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items() if k in fields})

    def recipe_key(self) -> dict:
        """The fields that must match for --resume to continue a run."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_RECIPE}


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The default values are the recommended recipe (README: "Training recipe")."""

    ABSENT_MEANS = {"hidden": 0}  # checkpoints written before the hidden layer existed had none

    data_dir: str = field(default="data", metadata=_doc("folder holding MNIST/raw/*-ubyte (torchvision layout)"))
    out: str = field(default="runs/mnist-cnn", metadata=_doc("output folder: checkpoint, metrics.json, curves.png"))
    epochs: int = field(default=10, metadata=_doc("number of training epochs", valid=">= 1"))
    batch_size: int = field(default=64, metadata=_doc("mini-batch size (shuffled, drop_last)", valid=">= 1"))
    lr: float = field(default=0.05, metadata=_doc("peak learning rate of the one-cycle schedule (SGD)", valid="> 0"))
    momentum: float = field(default=0.9, metadata=_doc("SGD momentum", valid="[0, 1)"))
    weight_decay: float = field(default=5e-4, metadata=_doc("L2 weight decay (not on batch-norm and bias)", valid=">= 0"))
    warmup: float = field(default=0.15, metadata=_doc("fraction of the steps spent warming the lr up", valid="[0, 1)"))
    label_smoothing: float = field(default=0.0, metadata=_doc("cross-entropy label smoothing", valid="[0, 1)"))
    augment: bool = field(default=True, metadata=_doc("random small shifts/rotations/scales of training images"))
    redraw: float = field(default=0.3, metadata=_doc("with --augment: share of images redrawn along their skeleton with a constant-width pen", valid="[0, 1]"))
    stroke_jitter: float = field(default=0.0, metadata=_doc("with --augment: share of images whose strokes are thickened or thinned", valid="[0, 1]"))
    elastic: float = field(default=0.0, metadata=_doc("with --augment: elastic distortion in pixels (0: none)", valid="[0, 5]"))
    channels: tuple[int, int, int] = field(default=(32, 64, 128), metadata=_doc("widths of the 3 conv layers"))
    hidden: int = field(default=256, metadata=_doc("width of the hidden fully connected layer before the classifier (0: none)", valid=">= 0"))
    dropout: float = field(default=0.25, metadata=_doc("dropout before the last linear layer", valid="[0, 1)"))
    val_size: int = field(default=5000, metadata=_doc("training images held out for validation", valid=">= 0"))
    train_limit: int = field(default=0, metadata=_doc("use only the first N training images (0: all); for quick runs", valid=">= 0"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: int = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)", valid=">= 0"))

    def other_problems(self) -> list[str]:
        if len(self.channels) != 3 or min(self.channels) < 1:
            return [f"--channels must be 3 positive widths (got {list(self.channels)})"]
        return []
