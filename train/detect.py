"""Train a detector on a COCO data set (`ferry train --task detect`).

The recipe (docs: "Detection"): images letterboxed by the runtime's own rule (`preprocess_letterbox`:
scaled to fit the input, never enlarged unless --upscale), with a random rescaling as augmentation;
the architecture's own torchvision losses; AdamW with a linear warm-up and cosine decay (the
backbone at a tenth of the rate when it starts from pretrained weights); gradients clipped. After
every epoch: COCO mAP on the validation images (faster-coco-eval) through the inference form that
export writes to ONNX (the post-processing included), a checkpoint that describes itself, and the
curves. `--resume` continues after the last completed epoch.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferry.core.errors import FerryError
from ferry.core.fileio import write_json_atomic
from ferry.core.machine import cpu_info
from ferry.models import checkpoint, detectors
from ferry.runtime import coco
from ferry.runtime.coco import CocoImage, CocoSet
from ferry.runtime.presets import Preprocess, letterbox_size, letterbox_spec
from ferry.train.detect_config import DetectConfig
from ferry.train.loop import device_name, resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
SPLIT_SEED = 20240531  # the held-out images do not depend on the training seed
GRAD_CLIP = 10.0
SCALE_JITTER = (0.8, 1.25)


# --- data ----------------------------------------------------------------------------------------


def scaled_size(im: CocoImage, spec: Preprocess, factor: float) -> tuple[int, int]:
    """(width, height) of an image once letterboxed and rescaled by `factor` (within the input)."""
    new_w, new_h = letterbox_size(im.width, im.height, spec)
    factor = min(factor, spec.size[1] / new_w, spec.size[0] / new_h)
    return max(8, round(new_w * factor)), max(8, round(new_h * factor))


class DetectionDataset(torch.utils.data.Dataset):
    """Images decoded by the runtime's decoder, scaled by the letterbox rule (and an augmentation
    factor; no padding: the model pads each batch, with zeros after normalizing, as the letterbox
    pads with the mean colour), and their boxes scaled alike; crowd regions are left out. Labels are
    category index + 1. Items are (index, factor) pairs, from SizeBatches."""

    def __init__(self, data: CocoSet, images: list[CocoImage], spec: Preprocess) -> None:
        self.data, self.images, self.spec = data, images, spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ferry.runtime.images import load_image
        from ferry.runtime.presets import INTERPOLATIONS, to_rgb

        i, factor = item
        im = self.images[i]
        img = to_rgb(load_image(self.data.path(im)))
        w, h = img.size
        new_w, new_h = scaled_size(im, self.spec, factor)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), INTERPOLATIONS[self.spec.interpolation])
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        boxes, classes = im.targets()
        scale = np.asarray([new_w / w, new_h / h, new_w / w, new_h / h], np.float32)
        boxes = torch.from_numpy(boxes * scale).reshape(-1, 4)
        return x, {"boxes": boxes, "labels": torch.from_numpy(classes + 1).long()}


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class SizeBatches(torch.utils.data.Sampler):
    """Each epoch's batches, of images of similar size: the model pads a batch to its largest image,
    so mixing 128 px and 256 px scenes would cost a 256 px scene each. The images are shuffled (and,
    with augmentation, given a random rescaling factor), taken in chunks of GROUP batches, each chunk
    sorted by the images' longer side and cut into batches, and the batches shuffled. Seeded by
    `seed`: the same epoch gives the same batches (so --resume is exact)."""

    GROUP = 16

    def __init__(self, images: list[CocoImage], spec: Preprocess, batch_size: int, *, augment: bool, seed: int) -> None:
        self.images, self.spec, self.batch_size, self.augment, self.seed = images, spec, batch_size, augment, seed

    def batches(self) -> list[list[tuple[int, float]]]:
        gen = torch.Generator().manual_seed(self.seed)
        n = len(self.images)
        order = torch.randperm(n, generator=gen).tolist()
        low, high = SCALE_JITTER
        factors = (torch.rand(n, generator=gen) * (high - low) + low).tolist() if self.augment else [1.0] * n
        chunk = self.batch_size * self.GROUP
        out: list[list[tuple[int, float]]] = []
        for start in range(0, n, chunk):
            part = sorted(order[start:start + chunk], key=lambda i: max(scaled_size(self.images[i], self.spec, factors[i])))
            out += [[(i, factors[i]) for i in part[k:k + self.batch_size]] for k in range(0, len(part), self.batch_size)]
        if len(out) > 1 and len(out[-1]) < self.batch_size // 2:
            out = out[:-1]  # no tiny last batch (its few images are in the next epoch's)
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def load_data(cfg: DetectConfig, *, saved: dict[str, Any] | None, log: Callable[[str], None]
              ) -> tuple[CocoSet, list[CocoImage], CocoSet, str]:
    """(the training set, the images to train on, the validation set, where it came from)."""
    train = coco.load_coco(cfg.data_dir, cfg.annotations, progress=log)
    if saved is not None:
        cats = [coco.Category(c["id"], c["name"]) for c in saved["categories"]]
        if [(c.id, c.name) for c in cats] != [(c.id, c.name) for c in train.categories]:
            raise FerryError(f"--resume: {cfg.annotations} has other categories than the checkpoint was trained with")
    if cfg.val_annotations:
        val = coco.load_coco(cfg.val_data_dir or cfg.data_dir, cfg.val_annotations, categories=train.categories, progress=log)
        train_images, source = train.images, "--val-annotations"
    else:
        kept, held = coco.split_held_out(train, cfg.val_fraction, SPLIT_SEED)
        val = train.subset(held)
        train_images = train.subset(kept).images
        source = f"{cfg.val_fraction:.0%} of {Path(cfg.annotations).name}, fixed split (seed {SPLIT_SEED})"
    if cfg.train_limit:
        train_images = train_images[: cfg.train_limit]
    if cfg.val_limit:
        val = val.subset(sorted(im.id for im in val.images)[: cfg.val_limit])
    if saved is not None and sorted(im.id for im in val.images) != sorted(saved["data"]["val_ids"]):
        # the split is recomputed from the images listed and readable now: a changed list moves images
        # between training and validation, and the resumed epochs would be measured on trained images
        moved = len({im.id for im in val.images} ^ set(saved["data"]["val_ids"]))
        raise FerryError(f"--resume: the validation images differ from the checkpoint's ({moved} image id(s) in one "
                         "and not the other: the annotations or the readable images changed since it was written); "
                         "start a new run (without --resume), or restore the images")
    if not train_images:
        raise FerryError(f"{cfg.annotations}: no training images left")
    if not val.boxes():  # checked before training: the epochs' mAP needs boxes to find
        raise FerryError(f"the validation images ({source}, {len(val.images)} image(s)) hold no boxes, so no mAP can be "
                         "measured; give --val-annotations with objects, or another --val-fraction/--val-limit")
    return train, train_images, val, source


# --- model and optimizer -----------------------------------------------------------------------------


def small_config(cfg: DetectConfig) -> detectors.SmallConfig | None:
    if cfg.arch != detectors.DEFAULT_ARCH:
        return None
    return detectors.SmallConfig(fpn_channels=cfg.fpn_channels, head_convs=cfg.head_convs)


def postprocess_of(cfg: DetectConfig) -> detectors.PostProcess:
    post = detectors.PostProcess(score_threshold=cfg.score_threshold, iou_threshold=cfg.nms_threshold,
                                 max_detections=cfg.max_detections)
    post.check()
    return post


def spec_of(cfg: DetectConfig) -> Preprocess:
    """The letterbox spec: the architecture's input side (or --image-size), ImageNet's mean and std
    (what torchvision's detectors normalize with, pretrained or not)."""
    size = cfg.image_size or detectors.default_image_size(cfg.arch)
    return letterbox_spec(size=size, upscale=cfg.upscale)


def make_optimizer(model: torch.nn.Module, cfg: DetectConfig, pretrained: bool) -> torch.optim.AdamW:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = pretrained and name.startswith("backbone.")
        groups.setdefault((backbone, p.ndim > 1), []).append(p)
    params = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
               "base_lr": cfg.lr * (0.1 if backbone else 1.0)} for (backbone, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


# --- the loop ------------------------------------------------------------------------------------------


def _loader(dataset: DetectionDataset, cfg: DetectConfig, *, seed: int) -> torch.utils.data.DataLoader:
    sampler = SizeBatches(dataset.images, dataset.spec, cfg.batch_size, augment=cfg.augment, seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=_collate,
                                       persistent_workers=False)


def train_one_epoch(model, optimizer, loader, cfg: DetectConfig, *, epoch: int, steps_per_epoch: int,
                    device: torch.device, progress: bool) -> dict[str, float]:
    from tqdm import tqdm

    model.train()
    total_steps = steps_per_epoch * cfg.epochs
    sums: dict[str, float] = {}
    seen = 0
    bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
               disable=None if progress else True, leave=False, file=sys.stderr)
    for i, (images, targets) in enumerate(bar):
        factor = lr_factor((epoch - 1) * steps_per_epoch + i, total_steps, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FerryError(f"training diverged at epoch {epoch} step {i}: loss is {loss.item()} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        n = len(images)
        seen += n
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item() * n
        sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
        if i % 10 == 0:
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
    bar.close()
    if not seen:
        raise FerryError("no training step ran (no images?)")
    return {k: v / seen for k, v in sums.items()}


def validate(model, arch: str, spec: Preprocess, post: detectors.PostProcess, val: CocoSet, device: torch.device
             ) -> dict[str, Any]:
    """COCO mAP of the inference form (what export writes) on the validation images."""
    if device.type != "cpu":
        model = model.to("cpu")
    module = detectors.InferenceDetector(model, arch, spec.size, post)
    found = detectors.torch_detections(module, val, spec)
    result = coco.evaluate(val, found)
    if device.type != "cpu":
        model.to(device)
    return result


def save_checkpoint(path: Path, *, model, optimizer, cfg: DetectConfig, train: CocoSet, val: CocoSet, val_source: str,
                    spec: Preprocess, post: detectors.PostProcess, weights_source: str, epoch: int, history: list[dict]) -> None:
    small = small_config(cfg)
    checkpoint.save(path, {
        "format": checkpoint.DETECTOR_FORMAT,
        "arch": cfg.arch,
        "categories": [c.to_dict() for c in train.categories],
        "preprocess": spec.to_dict(),
        "postprocess": post.to_dict(),
        "small": small.to_dict() if small else None,
        "weights_source": weights_source,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "data": {"root": str(Path(train.root).resolve()), "annotations": str(Path(train.annotations).resolve()),
                 "val_root": str(Path(val.root).resolve()), "val_annotations": str(Path(val.annotations).resolve()),
                 "val_source": val_source, "val_ids": sorted(im.id for im in val.images)},
        "epoch": epoch,
        "history": history,
    })


def train_detector(cfg: DetectConfig, *, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                   dry_run: bool = False) -> dict[str, Any]:
    """Train, validate each epoch, write checkpoint.pt, metrics.json and curves.png into cfg.out."""
    if dry_run:
        cfg = dataclasses.replace(cfg, epochs=min(cfg.epochs, 1), train_limit=cfg.train_limit or 64,
                                  val_limit=cfg.val_limit or 16)
    cfg.validate()
    detectors.check_arch(cfg.arch)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    weights = detectors.resolve_weights(cfg.arch, cfg.weights or detectors.default_weights(cfg.arch))

    saved = None
    if resume:
        if not ckpt_path.exists():
            raise FerryError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        saved = checkpoint.load_detector_state(ckpt_path)
        old = DetectConfig.from_dict(saved["config"])
        if old.recipe_key() != cfg.recipe_key():
            diffs = [f"{k}: checkpoint {v!r}, now {cfg.recipe_key()[k]!r}" for k, v in old.recipe_key().items()
                     if cfg.recipe_key()[k] != v]
            raise FerryError(f"--resume: {ckpt_path} was trained with a different recipe ({'; '.join(diffs)})")
    train, train_images, val, val_source = load_data(cfg, saved=saved, log=log)
    log(f"train: {train.subset(im.id for im in train_images).summary()}")
    log(f"validation: {val.summary()} ({val_source})")

    torch.manual_seed(cfg.seed)
    spec = spec_of(cfg)
    post = postprocess_of(cfg)
    if saved is None:
        model, note = detectors.build(cfg.arch, len(train.categories), weights, image_size=spec.size[0], mean=spec.mean,
                                      std=spec.std, small=small_config(cfg))
    else:  # the checkpoint's weights replace the starting point: nothing is downloaded
        model, _ = detectors.build(cfg.arch, len(train.categories), detectors.resolve_weights(cfg.arch, "none"),
                                   image_size=spec.size[0], mean=spec.mean, std=spec.std, small=small_config(cfg))
        note = saved.get("weights_source", "")
    model.to(device)
    optimizer = make_optimizer(model, cfg, weights.pretrained)
    history: list[dict] = []
    start_epoch = 1
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = list(saved["history"])
        start_epoch = int(saved["epoch"]) + 1
        log(f"resuming from {ckpt_path} after epoch {saved['epoch']}")
    steps = len(SizeBatches(train_images, spec, cfg.batch_size, augment=False, seed=0))
    log(f"training {cfg.arch} on {device_name(device)}: {len(train_images)} images, {len(train.categories)} categories, "
        f"input {spec.size[1]}x{spec.size[0]} (letterbox{', upscaled' if spec.upscale else ''}), {cfg.epochs} epoch(s) of "
        f"{steps} steps; {note}")

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0, cpu0 = time.perf_counter(), time.process_time()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # each epoch draws from its own seed: resume is exact
        loader = _loader(DetectionDataset(train, train_images, spec), cfg, seed=cfg.seed * 1_000_003 + epoch)
        losses = train_one_epoch(model, optimizer, loader, cfg, epoch=epoch, steps_per_epoch=steps, device=device,
                                 progress=progress)
        train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        ev = validate(model, cfg.arch, spec, post, val, device)
        history.append({"epoch": epoch, "train_loss": losses["loss"], "losses": losses, "val_map": ev["map"],
                        "val_map50": ev["map50"], "seconds": train_seconds, "cpu_seconds": train_cpu,
                        "validation_seconds": time.perf_counter() - t0 - train_seconds})
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, cfg=cfg, train=train, val=val, val_source=val_source,
                        spec=spec, post=post, weights_source=note, epoch=epoch, history=history)
        log(f"epoch {epoch:>3}/{cfg.epochs}  loss {losses['loss']:.4f}  val mAP {ev['map']:.4f}  mAP@0.5 {ev['map50']:.4f}  "
            f"{train_seconds:.1f}s (+{history[-1]['validation_seconds']:.1f}s validation)")

    final = history[-1] if history else {}
    metrics = {
        "task": "detect",
        "model": cfg.arch,
        "val_map": final.get("val_map"),
        "val_map50": final.get("val_map50"),
        "validation": {"source": val_source, "images": len(val.images), "boxes": val.boxes()},
        "train_seconds": sum(r["seconds"] for r in history),
        "validation_seconds": sum(r.get("validation_seconds", 0.0) for r in history),
        "epochs": history,
        "data": {"train": train.summary(), "train_images_used": len(train_images), "val": val.summary()},
        "categories": [c.to_dict() for c in train.categories],
        "preprocess": spec.to_dict(),
        "postprocess": post.to_dict(),
        "weights": note,
        "config": cfg.to_dict(),
        "checkpoint": CHECKPOINT_NAME,
        "dry_run": dry_run,
        "device": device_name(device),
        "machine": {**cpu_info(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_json_atomic(out / METRICS_NAME, metrics)
    from ferry.train.plot import plot_detection_curves

    plot_detection_curves(history, out / CURVES_NAME, title=f"{cfg.arch} on {Path(cfg.annotations).name}")
    log(f"validation mAP {final.get('val_map', float('nan')):.4f}, mAP@0.5 {final.get('val_map50', float('nan')):.4f} "
        f"({len(val.images)} images); training time {metrics['train_seconds']:.1f}s")
    log(f"wrote {ckpt_path}, {out / METRICS_NAME}, {out / CURVES_NAME}")
    return metrics
