"""TrainConfig: every training option, documented where it is declared (the docs become --help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Ge, Gt, Interval

from ferry.core.errors import FerryError


def _doc(text: str) -> dict[str, str]:
    """A field's --help text (the docs become --help). Its valid range is declared in its type with
    annotated-types (`Annotated[int, Ge(1)]`) and checked by pydantic in `Recipe.validate`."""
    return {"help": text}


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
_CTX = {"greater_than_equal": "ge", "greater_than": "gt", "less_than": "lt", "less_than_equal": "le"}


def _problem(err: dict) -> str:
    """One pydantic error as the flag and what it must be: `--lr must be > 0 (got -0.1)`."""
    flag = "--" + str(err["loc"][0]).replace("_", "-")
    kind = err["type"]
    if kind in _BOUNDS:
        return f"{flag} must be {_BOUNDS[kind]} {err['ctx'][_CTX[kind]]:g} (got {err['input']!r})"
    return f"{flag}: {err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})"


class Recipe:
    """What the training configs share: validation of the declared ranges, dict round trips
    (checkpoints store the config as plain data) and the recipe key that --resume compares."""

    NOT_RECIPE = ("out", "device", "threads", "data_dir", "workers")  # where and how, not what
    ABSENT_MEANS: dict = {}  # fields added later: the value a saved config without them was trained with

    def validate(self) -> None:
        """Raise one FerryError listing every nonsensical value: the ranges declared in the fields'
        types (checked by pydantic), then the checks a range cannot say (`other_problems`)."""
        from pydantic import TypeAdapter, ValidationError

        problems = []
        try:
            TypeAdapter(type(self)).validate_python(self.to_dict())
        except ValidationError as exc:
            problems += [_problem(err) for err in exc.errors(include_url=False)]
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
    """The default values are the recommended recipe (docs: "Training the digit CNN")."""

    ABSENT_MEANS = {"hidden": 0}  # checkpoints written before the hidden layer existed had none (DigitCNN.ABSENT_MEANS)

    data_dir: str = field(default="data", metadata=_doc("folder holding MNIST/raw/*-ubyte (torchvision layout)"))
    out: str = field(default="runs/mnist-cnn", metadata=_doc("output folder: checkpoint, metrics.json, curves.png"))
    epochs: Annotated[int, Ge(1)] = field(default=10, metadata=_doc("number of training epochs"))
    batch_size: Annotated[int, Ge(1)] = field(default=64, metadata=_doc("mini-batch size (shuffled, drop_last)"))
    lr: Annotated[float, Gt(0)] = field(default=0.05, metadata=_doc("peak learning rate of the one-cycle schedule (SGD)"))
    momentum: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.9, metadata=_doc("SGD momentum"))
    weight_decay: Annotated[float, Ge(0)] = field(default=5e-4, metadata=_doc("L2 weight decay (not on batch-norm and bias)"))
    warmup: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.15, metadata=_doc("fraction of the steps spent warming the lr up"))
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.0, metadata=_doc("cross-entropy label smoothing"))
    augment: bool = field(default=True, metadata=_doc("random small shifts/rotations/scales of training images"))
    redraw: Annotated[float, Interval(ge=0, le=1)] = field(default=0.3, metadata=_doc("with --augment: share of images redrawn along their skeleton with a constant-width pen"))
    stroke_jitter: Annotated[float, Interval(ge=0, le=1)] = field(default=0.0, metadata=_doc("with --augment: share of images whose strokes are thickened or thinned"))
    elastic: Annotated[float, Interval(ge=0, le=5)] = field(default=0.0, metadata=_doc("with --augment: elastic distortion in pixels (0: none)"))
    channels: tuple[int, int, int] = field(default=(32, 64, 128), metadata=_doc("widths of the 3 conv layers"))
    hidden: Annotated[int, Ge(0)] = field(default=256, metadata=_doc("width of the hidden fully connected layer before the classifier (0: none)"))
    dropout: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.25, metadata=_doc("dropout before the last linear layer"))
    val_size: Annotated[int, Ge(0)] = field(default=5000, metadata=_doc("training images held out for validation"))
    train_limit: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("use only the first N training images (0: all); for quick runs"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)"))

    def other_problems(self) -> list[str]:
        if len(self.channels) != 3 or min(self.channels) < 1:
            return [f"--channels must be 3 positive widths (got {list(self.channels)})"]
        return []
