"""Fine-tune any torchvision classifier on a folder of images (`ferry train --arch ARCH`).

The recipe (docs: "Your own images"): a short warm-up that trains only the new head on a frozen
pretrained backbone, then the whole network with the backbone at a tenth of the head's learning
rate; AdamW with a cosine schedule after a short linear warm-up; label smoothing; light augmentation
(random resized crop, horizontal flip, TrivialAugment); bf16 autocast and channels-last on CUDA.
Without pretrained weights (`--weights none`) there is nothing to protect: no frozen warm-up, one
learning rate for all. The checkpoint describes itself (architecture, classes, preprocessing,
weights, recipe and the held-out files) so `ferry export` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferry.core.errors import FerryError
from ferry.core.fileio import write_json_atomic
from ferry.core.machine import cpu_info
from ferry.models import checkpoint, tvmodels
from ferry.runtime import inputs
from ferry.runtime.inputs import FolderData, Sample
from ferry.runtime.presets import Preprocess, preprocess
from ferry.train import loop
from ferry.train.finetune_config import FinetuneConfig
from ferry.train.loop import autocast, device_name, resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
CONFUSION_NAME = "confusion.png"


# --- data ------------------------------------------------------------------------------------


class FolderDataset(torch.utils.data.Dataset):
    """Decoded with the runtime's safe decoder; `transform` maps a PIL image to a CHW tensor."""

    def __init__(self, root: Path, samples: list[Sample], transform: Callable[[Any], torch.Tensor]) -> None:
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from ferry.runtime.images import load_image
        from ferry.runtime.presets import to_rgb

        s = self.samples[i]
        return self.transform(to_rgb(load_image(self.root / s.path))), s.label


def train_transform(spec: Preprocess, cfg: FinetuneConfig):
    """Light augmentation at the model's input size, normalized with the spec's mean and std."""
    import torchvision.transforms.v2 as T

    crop = spec.crop[0]
    interp = T.InterpolationMode(spec.interpolation)
    steps: list[Any] = [T.PILToTensor()]
    if cfg.augment:
        steps += [T.RandomResizedCrop(crop, scale=(0.35, 1.0), interpolation=interp, antialias=True)]
    else:
        steps += [T.Resize(spec.resize, interpolation=interp, antialias=True), T.CenterCrop(crop)]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.augment:
        steps.append(T.TrivialAugmentWide(interpolation=interp))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(spec.mean), list(spec.std))]
    return T.Compose(steps)


def eval_transform(spec: Preprocess):
    """Exactly the runtime's preprocessing: what the exported model will be fed in deployment."""
    def transform(img) -> torch.Tensor:
        return torch.from_numpy(preprocess(img, spec))

    return transform


def stratified_limit(samples: list[Sample], limit: int, seed: int = inputs.SPLIT_SEED) -> list[Sample]:
    if not limit or limit >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n = max(1, round(limit * len(idx) / len(samples)))
        keep += list(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return [samples[i] for i in sorted(keep)]


# --- model and optimizer ----------------------------------------------------------------------


@dataclass
class Built:
    model: torch.nn.Module
    head: str
    weights: tvmodels.Weights
    spec: Preprocess


def build(cfg: FinetuneConfig, num_classes: int, *, weights: tvmodels.Weights | None = None) -> Built:
    weights = weights or tvmodels.resolve_weights(cfg.arch, cfg.weights)
    model, head = tvmodels.create(cfg.arch, weights, num_classes=num_classes)
    return Built(model, head, weights, tvmodels.preprocess_spec(cfg.arch, weights, cfg.image_size))


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def make_optimizer(built: Built, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """Four groups: head / backbone x decay / no decay. Each group's `base_lr` is its peak rate;
    the backbone's is --lr x --backbone-lr-factor when it starts from pretrained weights."""
    backbone_lr = cfg.lr * (cfg.backbone_lr_factor if built.weights.pretrained else 1.0)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in built.model.named_parameters():
        head = _is_head(name.rsplit(".", 1)[0], built.head)
        groups.setdefault((head, p.ndim > 1), []).append(p)
    params = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
               "base_lr": cfg.lr if head else backbone_lr, "head": head}
              for (head, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero."""
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def set_frozen(built: Built, frozen: bool) -> None:
    """Frozen: only the head learns; the backbone's BatchNorm statistics stay as pretrained."""
    for name, p in built.model.named_parameters():
        p.requires_grad_(not frozen or _is_head(name.rsplit(".", 1)[0], built.head))
    if frozen:
        for name, m in built.model.named_modules():
            if not _is_head(name, built.head) and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


# --- the loop -----------------------------------------------------------------------------------


def _loader(dataset, cfg: FinetuneConfig, *, shuffle: bool, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=cfg.workers,
        generator=gen, pin_memory=device.type == "cuda", persistent_workers=False,
    )


@torch.no_grad()
def evaluate(model, loader, device: torch.device, num_classes: int) -> dict[str, Any]:
    """Loss, top-1 and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)
    for xb, yb in loader:
        xb = xb.to(device, memory_format=torch.channels_last, non_blocking=True)
        yb = yb.to(device)
        with autocast(device):
            logits = model(xb)
        total_loss += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        np.add.at(confusion, (yb.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
    n = int(confusion.sum())
    return {"loss": total_loss / max(1, n), "accuracy": float(np.trace(confusion)) / max(1, n), "confusion": confusion}


def save_checkpoint(path: Path, *, built: Built, optimizer, cfg: FinetuneConfig, data: FolderData, epoch: int,
                    history: list[dict]) -> None:
    checkpoint.save(path, {
        "format": checkpoint.CLASSIFIER_FORMAT,
        "arch": cfg.arch,
        "classes": list(data.classes),
        "preprocess": built.spec.to_dict(),
        "head": built.head,
        "weights_source": built.weights.source,
        "model": {k: v.detach().cpu().contiguous() for k, v in built.model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "data": {"root": str(Path(data.root).resolve()), "val_source": data.val_source,
                 "val_files": [[s.path, s.label] for s in data.val]},
        "epoch": epoch,
        "history": history,
    })


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a fine-tuned classifier's checkpoint safely (weights_only=True)."""
    return checkpoint.load_classifier_state(path)


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fine-tuned model (eval mode) and its checkpoint's description."""
    state = load_checkpoint(path)
    return checkpoint.classifier_from_state(state, path), state


def train_one_epoch(built: Built, optimizer, loader, cfg: FinetuneConfig, *, epoch: int, steps_per_epoch: int,
                    device: torch.device, progress: bool) -> float:
    from tqdm import tqdm

    frozen = built.weights.pretrained and epoch <= cfg.frozen_epochs
    built.model.train()
    set_frozen(built, frozen)
    total = steps_per_epoch * cfg.epochs
    running, seen = 0.0, 0
    bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}" + (" (head only)" if frozen else ""),
               unit="batch", disable=None if progress else True, leave=False, file=sys.stderr)
    for i, (xb, yb) in enumerate(bar):
        factor = lr_factor((epoch - 1) * steps_per_epoch + i, total, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        xb = xb.to(device, memory_format=torch.channels_last, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        running += loop.step(built.model, optimizer, xb, yb, device=device, label_smoothing=cfg.label_smoothing,
                             where=f"epoch {epoch} step {i}")
        seen += yb.shape[0]
        if i % 20 == 0:
            bar.set_postfix(loss=f"{running / seen:.4f}")
    bar.close()
    if seen == 0:
        raise FerryError(f"no full batch of {cfg.batch_size} in the training images; lower --batch-size")
    return running / seen


def finetune(cfg: FinetuneConfig, *, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
             dry_run: bool = False) -> dict[str, Any]:
    """Train, evaluate on the held-out split, write checkpoint, metrics.json, curves and confusion matrix."""
    if dry_run:
        cfg = dataclasses.replace(cfg, epochs=min(cfg.epochs, 2), frozen_epochs=min(cfg.frozen_epochs, 1),
                                  train_limit=cfg.train_limit or 256)
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    weights = tvmodels.resolve_weights(cfg.arch, cfg.weights)  # a bad name fails before the folder is scanned

    saved = None
    if resume:
        if not ckpt_path.exists():
            raise FerryError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        saved = load_checkpoint(ckpt_path)
        old = FinetuneConfig.from_dict(saved["config"])
        if old.recipe_key() != cfg.recipe_key():
            diffs = [f"{k}: checkpoint {v!r}, now {cfg.recipe_key()[k]!r}" for k, v in old.recipe_key().items()
                     if cfg.recipe_key()[k] != v]
            raise FerryError(f"--resume: {ckpt_path} was trained with a different recipe ({'; '.join(diffs)})")
        data = inputs.from_checkpoint(cfg.data_dir, saved["classes"], [tuple(v) for v in saved["data"]["val_files"]], check=True)
        data.val_source = saved["data"]["val_source"]
    else:
        data = inputs.scan_class_folders(cfg.data_dir, val_fraction=cfg.val_fraction, progress=log)
    log(data.summary())
    train_samples = stratified_limit(data.train, cfg.train_limit)
    if len(train_samples) < cfg.batch_size:
        raise FerryError(f"{len(train_samples)} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size")

    torch.manual_seed(cfg.seed)
    built = build(cfg, len(data.classes), weights=weights)
    built.model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(built, cfg)
    history: list[dict] = []
    start_epoch = 1
    if saved is not None:
        built.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = list(saved["history"])
        start_epoch = int(saved["epoch"]) + 1
        log(f"resuming from {ckpt_path} after epoch {saved['epoch']}")

    spec = built.spec
    val_set = FolderDataset(data.root, data.val, eval_transform(spec))
    val_loader = _loader(val_set, dataclasses.replace(cfg, batch_size=max(cfg.batch_size, 64)), shuffle=False, seed=0, device=device)
    steps = len(train_samples) // cfg.batch_size
    mode = ("pretrained " + built.weights.source + f": head only for {cfg.frozen_epochs} epoch(s), then all layers "
            f"(backbone lr x{cfg.backbone_lr_factor})") if built.weights.pretrained else "random weights (--weights none): all layers from the start, one lr"
    log(f"fine-tuning {cfg.arch} on {device_name(device)} at {spec.crop[0]}px: {len(train_samples)} train / "
        f"{len(data.val)} held-out images, {len(data.classes)} classes, {cfg.epochs} epochs; {mode}")

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # each epoch draws from its own seed: resume is exact
        train_set = FolderDataset(data.root, train_samples, train_transform(spec, cfg))
        loader = _loader(train_set, cfg, shuffle=True, seed=cfg.seed * 1_000_003 + epoch, device=device)
        train_loss = train_one_epoch(built, optimizer, loader, cfg, epoch=epoch, steps_per_epoch=steps, device=device,
                                     progress=progress)
        ev = evaluate(built.model, val_loader, device, len(data.classes))
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": ev["loss"], "val_accuracy": ev["accuracy"],
                        "seconds": seconds, "frozen": bool(built.weights.pretrained and epoch <= cfg.frozen_epochs)})
        save_checkpoint(ckpt_path, built=built, optimizer=optimizer, cfg=cfg, data=data, epoch=epoch, history=history)
        log(f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {ev['loss']:.4f}  "
            f"val acc {ev['accuracy']:.2%}  {seconds:.1f}s")

    final = evaluate(built.model, val_loader, device, len(data.classes))
    confusion = final["confusion"]
    per_class = {c: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None
                 for i, c in enumerate(data.classes)}
    metrics = {
        "model": cfg.arch,
        "top1": final["accuracy"],
        "val_loss": final["loss"],
        "val_images": len(data.val),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "train_seconds": sum(r["seconds"] for r in history),
        "epochs": history,
        "data": {**data.info(), "train_images_used": len(train_samples)},
        "preprocess": spec.to_dict(),
        "weights": built.weights.source,
        "config": cfg.to_dict(),
        "checkpoint": CHECKPOINT_NAME,
        "dry_run": dry_run,
        "device": device_name(device),
        "machine": {**cpu_info(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_json_atomic(out / METRICS_NAME, metrics)
    from ferry.train.plot import plot_confusion, plot_curves

    plot_curves(history, out / CURVES_NAME, title=f"{cfg.arch} on {Path(cfg.data_dir).name}")
    plot_confusion(confusion, data.classes, out / CONFUSION_NAME, title=f"{cfg.arch}: held-out top-1 {final['accuracy']:.2%}")
    worst = sorted((v, c) for c, v in per_class.items() if v is not None)[:3]
    log(f"held-out top-1 {final['accuracy']:.2%} ({len(data.val)} images), training time {metrics['train_seconds']:.1f}s; "
        f"weakest classes: {', '.join(f'{c} {v:.1%}' for v, c in worst)}")
    log(f"wrote {ckpt_path}, {out / METRICS_NAME}, {out / CURVES_NAME}, {out / CONFUSION_NAME}")
    return metrics
