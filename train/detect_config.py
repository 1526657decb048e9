"""DetectConfig: the detection recipe (`ferry train --task detect`), every option documented where
it is declared (the docs become --help). No torch here: `ferry --help` must not need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Ge, Gt, Interval

from ferry.train.config import Recipe, _doc

DETECT_DEFAULT_ARCH = "fcos_small"


@dataclass(frozen=True)
class DetectConfig(Recipe):
    """The defaults are the recommended recipe: `fcos_small` trained from scratch (docs: "Detection")."""

    NOT_RECIPE = ("out", "device", "threads", "data_dir", "workers", "val_data_dir", "annotations", "val_annotations")

    arch: str = field(default=DETECT_DEFAULT_ARCH, metadata=_doc("detector: fcos_small or a torchvision detector"))
    data_dir: str = field(default="data", metadata=_doc("folder of the training images (file_name in the JSON is relative to it)"))
    annotations: str = field(default="", metadata=_doc("COCO instances JSON of the training images [detect only, required]"))
    val_annotations: str = field(default="", metadata=_doc("COCO instances JSON of validation images (default: hold out --val-fraction of the training images)"))
    val_data_dir: str = field(default="", metadata=_doc("folder of the validation images (default: --data-dir)"))
    out: str = field(default="runs/detect", metadata=_doc("output folder: checkpoint, metrics.json, curves.png"))
    weights: str = field(default="", metadata=_doc("COCO weights name of ARCH (DEFAULT, COCO_V1, ...), a state-dict file, or none (default: DEFAULT; none for fcos_small)"))
    image_size: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("the model's square input side in pixels (0: the architecture's own: 256 for fcos_small, 800 for most torchvision detectors)"))
    upscale: bool = field(default=False, metadata=_doc("enlarge images smaller than the input (off: objects keep their size in pixels)"))
    epochs: Annotated[int, Ge(1)] = field(default=2, metadata=_doc("number of training epochs"))
    batch_size: Annotated[int, Ge(1)] = field(default=8, metadata=_doc("images per step"))
    lr: Annotated[float, Gt(0)] = field(default=2e-3, metadata=_doc("peak AdamW learning rate (a tenth for pretrained backbones)"))
    weight_decay: Annotated[float, Ge(0)] = field(default=0.05, metadata=_doc("AdamW weight decay (not on norms and biases)"))
    warmup: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.05, metadata=_doc("fraction of the steps spent warming the lr up"))
    augment: bool = field(default=True, metadata=_doc("random rescaling of training images (0.8-1.25, within the input)"))
    score_threshold: Annotated[float, Interval(ge=0, lt=1)] = field(default=0.05, metadata=_doc("detections scoring at most this are dropped (in the exported graph)"))
    nms_threshold: Annotated[float, Interval(gt=0, le=1)] = field(default=0.5, metadata=_doc("per-class NMS IoU threshold"))
    max_detections: Annotated[int, Interval(ge=1, le=1000)] = field(default=100, metadata=_doc("detections kept per image"))
    fpn_channels: Annotated[int, Ge(8)] = field(default=32, metadata=_doc("fcos_small: width of its feature pyramid and head"))
    head_convs: Annotated[int, Ge(1)] = field(default=2, metadata=_doc("fcos_small: convolutions in each head branch"))
    val_fraction: Annotated[float, Interval(gt=0, lt=1)] = field(default=0.1, metadata=_doc("share of the training images held out when there is no --val-annotations"))
    train_limit: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("use only N training images (0: all); for quick runs"))
    val_limit: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("validate on N images only (0: all)"))
    workers: Annotated[int, Ge(0)] = field(default=1, metadata=_doc("data-loading worker processes"))
    device: str = field(default="auto", metadata=_doc("auto (CUDA when present, else CPU), cpu or cuda"))
    seed: int = field(default=0, metadata=_doc("random seed: same seed on the same device gives the same result"))
    threads: Annotated[int, Ge(0)] = field(default=0, metadata=_doc("CPU threads for torch (0: torch's default)"))

    def other_problems(self) -> list[str]:
        problems = []
        if not self.annotations:
            problems.append("--annotations TRAIN.json is required (the COCO instances JSON of --data-dir)")
        if self.image_size and not 32 <= self.image_size <= 2048:
            problems.append(f"--image-size must be 0 (the architecture's own) or from 32 to 2048 (got {self.image_size})")
        if self.image_size % 32:
            problems.append(f"--image-size must be a multiple of 32 (got {self.image_size})")
        return problems
