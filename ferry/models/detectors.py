"""Object detectors, shared by `ferry train --task detect` and `ferry export`: the architectures,
their weights (torchvision's weights API), and the inference form that export turns into ONNX.

Architectures (`DETECTOR_ARCHS`):

- `fcos_small` (the default recipe): FCOS from torchvision's components (its head, losses, anchor
  points and box coder) on a small backbone of ferry's: four stride-2 stages of 3x3 convolutions
  with BatchNorm (16, 32, 64, 128 channels), a feature pyramid (torchvision's) merged down to one
  map at stride 4 (`fpn_channels` wide), and a narrow head (`head_convs` convolutions with
  GroupNorm). Stride 4 and one level: every object of the digit scenes' sizes has anchor points
  inside it, even a 1 only a few pixels wide. No pretrained weights exist for it: it trains from
  scratch at the scenes' own scale.
- torchvision's detectors by name: `fasterrcnn_mobilenet_v3_large_fpn`, `retinanet_resnet50_fpn_v2`,
  `fcos_resnet50_fpn`, `ssdlite320_mobilenet_v3_large` (and the other members of these families),
  pretrained on COCO through torchvision's weights API (the class layers are new for the user's
  categories), or random with `--weights none`.

Every model is trained with torchvision's own losses (`model(images, targets)`) on letterboxed
images (`ferry.runtime.presets.preprocess_letterbox`), and runs for inference and export as a
`InferenceDetector`: a fixed-size letterboxed batch in, padded detections out (boxes x1, y1, x2, y2 in
input pixels, scores, labels), with the post-processing (score threshold, per-class NMS, the best
`max_detections`) inside the module. NMS is one custom operator, `ferry::nms_mask` (torchvision's
`nms` in PyTorch; ONNX's NonMaxSuppression once exported), whose output has a fixed shape, so the
whole detector exports as one graph with a dynamic batch. Class index 0 is the background in every
model (torchvision's convention); category i of the data set is class i + 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferry.core.errors import FerryError
from ferry.models.tvmodels import Weights, WeightsUnavailable

DEFAULT_ARCH = "fcos_small"
FAMILIES = ("fasterrcnn", "retinanet", "fcos", "ssd")  # torchvision's box detectors, by name prefix
NAMED = ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
         "ssdlite320_mobilenet_v3_large")  # the ones ferry documents and tests


@dataclass(frozen=True)
class PostProcess:
    """What happens after the network, inside the exported graph."""

    score_threshold: float = 0.05  # detections scoring at most this are dropped (COCO evaluation keeps low scores)
    iou_threshold: float = 0.5  # per-class NMS: a box overlapping a better one of its class by more is dropped
    max_detections: int = 100  # per image, the best by score (the outputs' fixed size)
    candidates: int = 1000  # per image, the best (box, class) pairs by score that go into NMS

    def check(self) -> None:
        if not 0 <= self.score_threshold < 1 or not 0 < self.iou_threshold <= 1:
            raise FerryError(f"score threshold must be in [0, 1) and IoU threshold in (0, 1] (got {self.score_threshold}, "
                             f"{self.iou_threshold})")
        if not 1 <= self.max_detections <= self.candidates:
            raise FerryError(f"max detections must be from 1 to the candidates ({self.candidates}) (got {self.max_detections})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SmallConfig:
    """The shape of `fcos_small`."""

    widths: tuple[int, int, int, int] = (16, 32, 64, 128)  # the four backbone stages (strides 2, 4, 8, 16)
    fpn_channels: int = 32  # the pyramid's and the head's width
    head_convs: int = 2  # convolutions in each head branch (classification; box and centre-ness)
    anchor_size: int = 8  # the anchor points' scale (FCOS: box distances are in units of it)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmallConfig:
        return cls(**{k: tuple(v) if k == "widths" else v for k, v in d.items() if k in cls.__dataclass_fields__})


# --- names -----------------------------------------------------------------------------------------


def family(arch: str) -> str:
    if arch == DEFAULT_ARCH:
        return "fcos"
    for f in FAMILIES:
        if arch.startswith(f):
            return f
    raise FerryError(f"unknown detector {arch!r}")


def detector_archs() -> list[str]:
    """fcos_small and torchvision's box detectors (Mask and Keypoint R-CNN are not box detectors)."""
    import torchvision.models.detection as tvd
    from torchvision.models import list_models

    tv = [a for a in list_models(module=tvd) if a.startswith(FAMILIES)]
    return [DEFAULT_ARCH, *sorted(tv)]


def is_detector(arch: str) -> bool:
    return arch == DEFAULT_ARCH or arch.startswith(FAMILIES)


def check_arch(arch: str) -> None:
    archs = detector_archs()
    if arch not in archs:
        import difflib

        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FerryError(f"unknown detector {arch!r}{hint}; ferry detects with: {', '.join(archs)}")


def default_image_size(arch: str) -> int:
    """The input side each architecture was designed for: torchvision's (800; SSDlite 320; SSD300
    300), and 256 for fcos_small (the digit scenes' largest canvas)."""
    if arch == DEFAULT_ARCH:
        return 256
    if arch.startswith("ssdlite"):
        return 320
    if arch.startswith("ssd"):
        return 300
    return 800


def default_weights(arch: str) -> str:
    return "none" if arch == DEFAULT_ARCH else "DEFAULT"


def resolve_weights(arch: str, weights: str) -> Weights:
    """`none`, a torchvision weights name of `arch` (COCO_V1, DEFAULT, ...) or a state-dict file."""
    check_arch(arch)
    if weights.lower() == "none":
        return Weights("none")
    if arch == DEFAULT_ARCH:
        path = Path(weights)
        if path.is_file():
            from ferry.core.fileio import sha256_file

            return Weights(f"file {path.name} (sha256 {sha256_file(path)[:16]})", path=path)
        raise FerryError(f"{DEFAULT_ARCH} has no pretrained weights: use --weights none (its recipe trains from scratch) "
                         "or a state-dict file")
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    names = list(enum.__members__)
    if weights.upper() in names:
        member = enum[weights.upper()]
        return Weights(member.name if weights.upper() != "DEFAULT" else f"DEFAULT ({member.name})", enum=member)
    path = Path(weights)
    if path.is_file():
        from ferry.core.fileio import sha256_file

        return Weights(f"file {path.name} (sha256 {sha256_file(path)[:16]})", path=path)
    raise FerryError(f"--weights {weights!r} is not a file, nor one of {arch}'s weights: {', '.join(names)}, or none")


# --- fcos_small ----------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallBackbone(nn.Module):
    """Four stages (each a stride-2 conv and a conv), a feature pyramid over stages 2-4 (strides 4,
    8 and 16), returning its finest map only (stride 4), which the coarser ones have been merged into."""

    def __init__(self, cfg: SmallConfig) -> None:
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        c1, c2, c3, c4 = cfg.widths
        self.stem = _conv(3, c1, 2)
        self.stage2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2, 1))
        self.stage3 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3, 1))
        self.stage4 = nn.Sequential(_conv(c3, c4, 2), _conv(c4, c4, 1))
        self.fpn = FeaturePyramidNetwork([c2, c3, c4], cfg.fpn_channels)
        self.out_channels = cfg.fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c2 = self.stage2(self.stem(x))
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        p = self.fpn(OrderedDict([("c2", c2), ("c3", c3), ("c4", c4)]))
        return OrderedDict([("p2", p["c2"])])


def _groups(channels: int) -> int:
    return math.gcd(channels, 16)


def _small_head(channels: int, num_classes: int, convs: int) -> nn.Module:
    """torchvision's FCOSHead with GroupNorm of gcd(channels, 16) groups (its own has 32: too many
    for a narrow head)."""
    from torchvision.models.detection._utils import BoxLinearCoder
    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

    class SmallFCOSHead(FCOSHead):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            norm = partial(nn.GroupNorm, _groups(channels))
            self.box_coder = BoxLinearCoder(normalize_by_size=True)
            self.classification_head = FCOSClassificationHead(channels, 1, num_classes, convs, norm_layer=norm)
            self.regression_head = FCOSRegressionHead(channels, 1, convs, norm_layer=norm)

    return SmallFCOSHead()


def build_small(num_classes: int, cfg: SmallConfig, image_size: int, mean, std) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if cfg.head_convs < 1 or cfg.fpn_channels < 8 or min(cfg.widths) < 4:
        raise FerryError(f"fcos_small: head_convs >= 1, fpn_channels >= 8 and widths >= 4 (got {cfg})")
    backbone = SmallBackbone(cfg)
    head = _small_head(cfg.fpn_channels, num_classes, cfg.head_convs)
    return FCOS(backbone, num_classes, min_size=image_size, max_size=image_size, image_mean=list(mean),
                image_std=list(std), anchor_generator=AnchorGenerator(((cfg.anchor_size,),), ((1.0,),)), head=head,
                _skip_resize=True, size_divisible=32)


# --- building ------------------------------------------------------------------------------------


def build(arch: str, num_classes: int, weights: Weights, *, image_size: int, mean, std,
          small: SmallConfig | None = None) -> tuple[nn.Module, str]:
    """The training form of `arch` for `num_classes` categories (plus the background): torchvision's
    detector, whose `model(images, targets)` returns its losses. Images are letterboxed by the
    caller, so the model's own resizing is off (`_skip_resize`); it normalizes with `mean` and
    `std` and pads each batch to a multiple of 32 (SSD: to the whole input, as its default boxes follow the
    padded size). Returns (model, what was done with the weights)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    check_arch(arch)
    classes = num_classes + 1
    if arch == DEFAULT_ARCH:
        model = build_small(classes, small or SmallConfig(), image_size, mean, std)
        note = "random weights"
        if weights.path is not None:
            note = _load_matching(model, _state_dict_file(weights.path), arch, weights.source)
        return model, note
    import torchvision.models as tvm

    try:
        model = tvm.get_model(arch, weights=None, weights_backbone=None, num_classes=classes)
    except TypeError as exc:  # an architecture whose builder takes other arguments
        raise FerryError(f"cannot build {arch}: {exc}") from exc
    note = "random weights"
    if weights.enum is not None:
        note = _load_matching(model, _download(arch, weights), arch, weights.source)
    elif weights.path is not None:
        note = _load_matching(model, _state_dict_file(weights.path), arch, weights.source)
    # SSD's default boxes are sized by the padded batch: pad every batch to the whole input, as export sees it
    size_divisible = image_size if family(arch) == "ssd" else 32
    model.transform = GeneralizedRCNNTransform(image_size, image_size, list(mean), list(std),
                                               size_divisible=size_divisible, _skip_resize=True)
    return model, note


def _download(arch: str, weights: Weights) -> dict[str, torch.Tensor]:
    url = weights.enum.url
    try:
        return weights.enum.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError, socket and SSL errors: the weights could not be fetched
        raise WeightsUnavailable(
            f"could not get {arch} weights {weights.enum.name} ({url}): {type(exc).__name__}: {str(exc)[:120]}. Offline? "
            f"Download {Path(url).name} elsewhere and pass --weights /path/to/{Path(url).name} (or put it in "
            f"{torch.hub.get_dir()}/checkpoints/), or use --weights none"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt cached file, a hash mismatch: not "offline"
        raise FerryError(f"could not load {arch} weights {weights.source}: {type(exc).__name__}: {str(exc)[:160]}") from exc


def _state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from ferry.models.tvmodels import load_state_dict

    return load_state_dict(path)


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> str:
    """Load every tensor of `state` whose name and shape fit `model`; the class layers (whose shape
    depends on the number of categories) start fresh. A file of another architecture is an error."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(fitting) < 0.5 * len(own):
        raise FerryError(f"weights {source} do not fit {arch}: {len(fitting)} of its {len(own)} tensors match")
    model.load_state_dict(fitting, strict=False)
    fresh = sorted({k.rsplit(".", 1)[0] for k in own if k not in fitting})
    return f"pretrained {source}; new layers for the categories: {', '.join(fresh) or 'none'}"


# --- the custom NMS operator ------------------------------------------------------------------------


@torch.library.custom_op("ferry::nms_mask", mutates_args=())
def nms_mask(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
             max_per_class: int) -> torch.Tensor:
    """Per-class NMS with a fixed-shape result: boxes (N, P, 4) x1, y1, x2, y2; scores (N, C, P) ->
    (N, C, P) 1.0 where box p survives in class c (its score above `score_threshold`, no better box
    of its class overlapping it by IoU above `iou_threshold`, and among the `max_per_class` best of
    its class), else 0.0. ONNX's NonMaxSuppression computes the same (export/detect.py)."""
    from torchvision.ops import batched_nms

    out = torch.zeros_like(scores)
    n, c, _ = scores.shape
    for b in range(n):  # one batched (per-class) NMS per image, as torchvision's detectors do
        cls, idx = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
        if not idx.numel():
            continue
        keep = batched_nms(boxes[b, idx], scores[b, cls, idx], cls, iou_threshold)  # best first
        onehot = torch.nn.functional.one_hot(cls[keep], c)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # each survivor's place within its class
        keep = keep[rank < max_per_class]
        out[b, cls[keep], idx[keep]] = 1.0
    return out


@nms_mask.register_fake
def _nms_mask_fake(boxes, scores, iou_threshold, score_threshold, max_per_class):
    return torch.empty_like(scores)


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, post: PostProcess, size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense predictions -> padded detections.

    boxes: (N, A, 4), or (N, A, C, 4) with a box per class; scores: (N, A, C) for the C categories
    (the background left out). The `candidates` best (anchor, class) pairs by score go into per-class
    NMS; of the survivors, the `max_detections` best are returned: boxes (N, K, 4) clipped to the
    input, scores (N, K) (0 where there is no detection) and labels (N, K) int64 (the category index,
    -1 where there is no detection), K = `max_detections` always (padded when the network has fewer
    (anchor, class) pairs)."""
    n, a, c = scores.shape
    flat = scores.reshape(n, a * c)
    p = min(post.candidates, a * c)
    k = min(post.max_detections, p)
    top, idx = flat.topk(p, dim=1)
    anchor = torch.div(idx, c, rounding_mode="floor")
    cls = idx - anchor * c
    if boxes.dim() == 4:
        per_class = boxes.reshape(n, a * c, 4)
        cand = torch.gather(per_class, 1, idx.unsqueeze(-1).expand(n, p, 4))
    else:
        cand = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(n, p, 4))
    h, w = size
    limits = torch.tensor([w, h, w, h], dtype=cand.dtype)
    cand = torch.minimum(cand.clamp(min=0), limits)
    onehot = (cls.unsqueeze(1) == torch.arange(c).view(1, c, 1)).to(top.dtype) * top.unsqueeze(1)  # (N, C, P)
    keep = torch.ops.ferry.nms_mask(cand, onehot, post.iou_threshold, post.score_threshold, post.max_detections)
    kept = top * keep.sum(dim=1)  # each candidate belongs to one class
    best, order = kept.topk(k, dim=1)
    out_boxes = torch.gather(cand, 1, order.unsqueeze(-1).expand(n, k, 4))
    valid = best > post.score_threshold
    labels = torch.where(valid, torch.gather(cls, 1, order), torch.full_like(order, -1))
    out_boxes, best = out_boxes * valid.unsqueeze(-1).to(out_boxes.dtype), best * valid.to(best.dtype)
    pad = post.max_detections - k
    if pad:  # fewer (anchor, class) pairs than detections asked for: K stays max_detections, as the metadata says
        out_boxes = nn.functional.pad(out_boxes, (0, 0, 0, pad))
        best = nn.functional.pad(best, (0, pad))
        labels = nn.functional.pad(labels, (0, pad), value=-1)
    return out_boxes, best, labels


# --- the inference form ------------------------------------------------------------------------------


def _anchors(model: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 3, *size), [size])
    return model.anchor_generator(images, features)[0]


def _decode_deltas(deltas: torch.Tensor, anchors: torch.Tensor, weights: tuple[float, ...], clip: float) -> torch.Tensor:
    """torchvision's BoxCoder.decode_single, batched: deltas (..., 4) against anchors (..., 4)."""
    wx, wy, ww, wh = weights
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    cx = anchors[..., 0] + 0.5 * widths
    cy = anchors[..., 1] + 0.5 * heights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw, dh = torch.clamp(deltas[..., 2] / ww, max=clip), torch.clamp(deltas[..., 3] / wh, max=clip)
    pcx, pcy = dx * widths + cx, dy * heights + cy
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=-1)


class InferenceDetector(nn.Module):
    """A trained detector as it is exported: x (N, 3, H, W), letterboxed and normalized -> boxes (N, K, 4)
    in input pixels, scores (N, K), labels (N, K) int64 (category index, -1 for none)."""

    def __init__(self, model: nn.Module, arch: str, size: tuple[int, int], post: PostProcess,
                 two_stage: dict[str, int] | None = None) -> None:
        super().__init__()
        post.check()
        self.model, self.family, self.size, self.post = model.eval(), family(arch), tuple(size), post
        self.two_stage = {"proposals": 300, "candidates": 1000, **(two_stage or {})}
        with torch.no_grad():
            named = model.backbone(torch.zeros(1, 3, *self.size))
            features = list(named.values())
            if self.family == "fasterrcnn":
                anchors = _anchors(model.rpn, features, self.size)
                self.roi_names = [k for k in model.roi_heads.box_roi_pool.featmap_names if k in named]
            else:
                anchors = _anchors(model, features, self.size)
        self.register_buffer("anchors", anchors, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.family == "fasterrcnn":
            boxes, scores = self._two_stage(x)
        else:
            boxes, scores = self.dense(x)
        return postprocess(boxes, scores, self.post, self.size)

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (N, A, 4) and category scores (N, A, C) of a one-stage detector."""
        m = self.model
        features = list(m.backbone(x).values())
        out = m.head(features)
        if self.family == "fcos":
            r = out["bbox_regression"]
            a = self.anchors
            ctr_x, ctr_y = 0.5 * (a[:, 0] + a[:, 2]), 0.5 * (a[:, 1] + a[:, 3])
            size = a[:, 2] - a[:, 0]
            boxes = torch.stack((ctr_x - r[..., 0] * size, ctr_y - r[..., 1] * size,
                                 ctr_x + r[..., 2] * size, ctr_y + r[..., 3] * size), dim=-1)
            scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
            return boxes, scores[..., 1:]
        coder = m.box_coder
        boxes = _decode_deltas(out["bbox_regression"], self.anchors, coder.weights, coder.bbox_xform_clip)
        if self.family == "retinanet":
            return boxes, torch.sigmoid(out["cls_logits"])[..., 1:]
        return boxes, torch.softmax(out["cls_logits"], dim=-1)[..., 1:]  # ssd

    def _two_stage(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Faster R-CNN: RPN proposals (the best by objectness through NMS, a fixed number per image),
        RoIAlign on the pyramid level each proposal's size selects, the box head: a box per class."""
        import torchvision
        from torchvision.ops.poolers import _setup_scales

        m, ts = self.model, self.two_stage
        feats = m.backbone(x)
        levels = list(feats.values())
        objectness, deltas = m.rpn.head(levels)
        n = x.shape[0]
        obj = torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1) for o in objectness], dim=1)
        # RPNHead's deltas are (N, A*4, H, W): anchors vary fastest within a location
        dlt = torch.cat([d.view(n, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                         for d in deltas], dim=1)
        coder = m.rpn.box_coder
        proposals = _decode_deltas(dlt, self.anchors, coder.weights, coder.bbox_xform_clip)
        rpn_post = PostProcess(score_threshold=0.0, iou_threshold=m.rpn.nms_thresh, max_detections=ts["proposals"],
                               candidates=min(ts["candidates"], obj.shape[1]))
        boxes, prop_scores, _ = postprocess(proposals, torch.sigmoid(obj).unsqueeze(-1), rpn_post, self.size)
        valid = (prop_scores > 0).to(boxes.dtype)  # padding proposals: scores 0
        r = boxes.shape[1]
        batch_idx = torch.arange(n, dtype=boxes.dtype).view(n, 1, 1).expand(n, r, 1)
        rois = torch.cat([batch_idx, boxes], dim=-1).reshape(n * r, 5)
        pool = m.roi_heads.box_roi_pool
        pooled_levels = [feats[k] for k in self.roi_names]
        scales, mapper = _setup_scales(pooled_levels, [self.size], pool.canonical_scale, pool.canonical_level)
        level = mapper([boxes.reshape(n * r, 4)])
        pooled = None
        for i, (feat, scale) in enumerate(zip(pooled_levels, scales)):
            out = torchvision.ops.roi_align(feat, rois, pool.output_size, spatial_scale=scale,
                                            sampling_ratio=pool.sampling_ratio)
            chosen = (level == i).to(out.dtype).view(-1, 1, 1, 1)
            pooled = out * chosen if pooled is None else pooled + out * chosen
        head = m.roi_heads.box_head(pooled)
        class_logits, box_regression = m.roi_heads.box_predictor(head)
        c1 = class_logits.shape[-1]
        per_class = _decode_deltas(box_regression.reshape(n * r, c1, 4), boxes.reshape(n * r, 1, 4),
                                   m.roi_heads.box_coder.weights, m.roi_heads.box_coder.bbox_xform_clip)
        scores = torch.softmax(class_logits, dim=-1)[:, 1:] * valid.reshape(n * r, 1)
        return per_class[:, 1:].reshape(n, r, c1 - 1, 4), scores.reshape(n, r, c1 - 1)


# --- running the PyTorch model on a data set ----------------------------------------------------------


@torch.no_grad()
def torch_detections(module: InferenceDetector, data, spec, *, batch_size: int = 16,
                     progress=None) -> dict[int, Any]:
    """The detections of `module` (PyTorch) on every image of `data` (a CocoSet), fed exactly what
    the runtime feeds the exported model (`preprocess_letterbox`), boxes mapped back to each image's
    pixels: image id -> ferry.runtime.coco.ImageDetections."""
    import numpy as np

    from ferry.runtime.coco import ImageDetections
    from ferry.runtime.images import load_image
    from ferry.runtime.presets import preprocess_letterbox

    module.eval()
    out: dict[int, Any] = {}
    images = list(data.images)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays, frames = zip(*(preprocess_letterbox(load_image(data.path(im)), spec) for im in chunk))
        boxes, scores, labels = (t.numpy() for t in module(torch.from_numpy(np.stack(arrays))))
        for im, frame, b, s, lab in zip(chunk, frames, boxes, scores, labels):
            keep = lab >= 0
            out[im.id] = ImageDetections(frame.to_original(b[keep]), s[keep], lab[keep])
        if progress:
            progress(min(start + batch_size, len(images)))
    return out
