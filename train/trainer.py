"""The training loop: `train(config)` trains DigitCNN on MNIST and writes checkpoint, metrics, plot."""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ferry.core.errors import FerryError
from ferry.core.fileio import write_json_atomic
from ferry.core.machine import cpu_info
from ferry.models import checkpoint
from ferry.models.digit_cnn import DigitCNN
from ferry.train import data, loop
from ferry.train.config import TrainConfig
from ferry.train.loop import autocast, device_name, resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
PLOT_NAME = "curves.png"


def build_model(cfg: TrainConfig) -> DigitCNN:
    return DigitCNN.from_config(cfg.to_dict())


def lr_at(step: int, total_steps: int, *, peak: float, warmup: float) -> float:
    """One-cycle schedule: linear warm-up from peak/20 to peak, then cosine decay to ~0."""
    warm = max(1, int(total_steps * warmup))
    if step < warm:
        return peak * (0.05 + 0.95 * step / warm)
    progress = (step - warm) / max(1, total_steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (a fraction) of `model` on uint8 images `x`."""
    if x.shape[0] == 0:
        return float("nan"), float("nan")
    model.eval()
    total_loss, correct = 0.0, 0
    for xb, yb in data.batches(x, y, batch_size=batch_size):
        xb = data.normalize(xb.to(device)).contiguous(memory_format=torch.channels_last)
        yb = yb.to(device)
        with autocast(device):
            logits = model(xb)
        total_loss += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return total_loss / x.shape[0], correct / x.shape[0]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch draws its shuffling, augmentation and dropout from its own seed, so a run
    # resumed after epoch k continues exactly as the uninterrupted run would have.
    return seed * 1_000_003 + epoch


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: data.MnistSplits,
    cfg: TrainConfig,
    *,
    epoch: int,
    device: torch.device,
    progress: bool = True,
) -> float:
    """Train one epoch (1-based `epoch`); return the mean training loss."""
    from tqdm import tqdm

    torch.manual_seed(_epoch_seed(cfg.seed, epoch))
    gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
    n_steps = data.steps_per_epoch(splits.train_x.shape[0], cfg.batch_size)
    total_steps = n_steps * cfg.epochs
    model.train()
    running, seen = 0.0, 0
    bar = tqdm(
        data.batch_indices(splits.train_x.shape[0], batch_size=cfg.batch_size, generator=gen, shuffle=True, drop_last=True),
        total=n_steps,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        disable=None if progress else True,  # None: only on a terminal
        leave=False,
        file=sys.stderr,
    )
    for i, idx in enumerate(bar):
        xb, yb = splits.train_x[idx], splits.train_y[idx]
        step = (epoch - 1) * n_steps + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, peak=cfg.lr, warmup=cfg.warmup)
        xb = data.to_unit(xb.to(device, non_blocking=True))  # uint8 to the device, augmented there
        if cfg.augment:
            if cfg.redraw > 0 and splits.train_pen is not None:
                pick = torch.nonzero(torch.rand(len(idx), generator=gen) < cfg.redraw).squeeze(1)
                if len(pick):
                    pen = splits.train_pen[idx[pick]].to(device).unsqueeze(1)
                    xb[pick.to(device)] = data.redraw_with_pen(pen, gen)
            xb = data.stroke_width_jitter(xb, gen, p=cfg.stroke_jitter)
            xb = data.random_warp(xb, gen, elastic_px=cfg.elastic)
        xb = data.standardize(xb).contiguous(memory_format=torch.channels_last)
        yb = yb.to(device, non_blocking=True)
        running += loop.step(model, optimizer, xb, yb, device=device, label_smoothing=cfg.label_smoothing,
                             where=f"epoch {epoch} step {i}")
        seen += yb.shape[0]
        if i % 50 == 0:
            bar.set_postfix(loss=f"{running / seen:.4f}")
    bar.close()
    if seen == 0:
        raise FerryError(
            f"no full batch of {cfg.batch_size} in {splits.train_x.shape[0]} training images; lower --batch-size"
        )
    return running / seen


def save_checkpoint(path: Path, *, model, optimizer, cfg: TrainConfig, epoch: int, history: list[dict]) -> None:
    checkpoint.save(path, {
        "format": checkpoint.DIGIT_CNN_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "epoch": epoch,
        "history": history,
    })


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ferry checkpoint safely (weights_only=True); a bad file is a FerryError."""
    return checkpoint.load_digit_cnn_state(path)


def load_model(path: str | Path) -> tuple[DigitCNN, TrainConfig]:
    """Load the trained DigitCNN (eval mode) and its config from a checkpoint."""
    return model_from_checkpoint(load_checkpoint(path), path)


def model_from_checkpoint(state: dict, path: str | Path) -> tuple[DigitCNN, TrainConfig]:
    """The trained DigitCNN (eval mode) and its config from a loaded checkpoint (`path` names it in errors)."""
    return checkpoint.digit_cnn_from_state(state, path), TrainConfig.from_dict(state["config"])


def _plot(history: list[dict], path: Path) -> None:
    from ferry.train.plot import plot_curves

    plot_curves(history, path)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    splits: data.MnistSplits | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Train, evaluate on the official test set and write checkpoint, metrics.json and curves.png.

    `splits` lets tests pass synthetic data; by default MNIST is read from `cfg.data_dir`.
    `dry_run` trains one epoch on 2,048 images and evaluates on 1,000, to check the set-up quickly.
    Returns the metrics written to metrics.json.
    """
    if dry_run:
        cfg = dataclasses.replace(cfg, epochs=1, train_limit=2048)
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    history: list[dict] = []
    start_epoch = 1
    torch.manual_seed(cfg.seed)
    # channels_last roughly halves the CPU step time of this model (oneDNN's NHWC convolutions).
    model = build_model(cfg).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    if resume:
        if not ckpt_path.exists():
            raise FerryError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        state = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        if saved.recipe_key() != cfg.recipe_key():
            diffs = [f"{k}: checkpoint {v!r}, now {cfg.recipe_key()[k]!r}" for k, v in saved.recipe_key().items() if cfg.recipe_key()[k] != v]
            raise FerryError(f"--resume: {ckpt_path} was trained with a different recipe ({'; '.join(diffs)})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        log(f"resuming from {ckpt_path} after epoch {state['epoch']}")

    t_prepare = time.perf_counter()  # reading MNIST and tracing the skeletons count as training time too
    if splits is None:
        train_x, train_y, test_x, test_y = data.load_mnist_arrays(cfg.data_dir, download=True)
        splits = data.split(train_x, train_y, test_x, test_y, val_size=cfg.val_size, train_limit=cfg.train_limit)
    if cfg.augment and cfg.redraw > 0 and splits.train_pen is None:
        splits = dataclasses.replace(splits, train_pen=data.pen_distances(splits.train_x))
    prepare_seconds = time.perf_counter() - t_prepare
    if dry_run:
        splits = dataclasses.replace(splits, val_x=splits.val_x[:1000], val_y=splits.val_y[:1000],
                                     test_x=splits.test_x[:1000], test_y=splits.test_y[:1000])
    log(
        f"training {model.architecture()} on {device_name(device)}: {splits.train_x.shape[0]} train / "
        f"{splits.val_x.shape[0]} val / {splits.test_x.shape[0]} test images, {cfg.epochs} epochs"
    )

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_one_epoch(model, optimizer, splits, cfg, epoch=epoch, device=device, progress=progress)
        val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": seconds,
            "lr_end": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, cfg=cfg, epoch=epoch, history=history)
        log(
            f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc:.4%}  {seconds:.1f}s"
        )

    test_loss, test_acc = evaluate(model, splits.test_x, splits.test_y, device)
    metrics = {
        "model": "mnist-cnn",
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "test_images": int(splits.test_x.shape[0]),
        "train_seconds": sum(r["seconds"] for r in history),  # the epochs (this run's, and a resumed run's before)
        "prepare_seconds": prepare_seconds,  # this run's: MNIST read, the redraw's skeletons traced
        "device": device_name(device),
        "epochs": history,
        "config": cfg.to_dict(),
        "checkpoint": CHECKPOINT_NAME,
        "dry_run": dry_run,
        "machine": {
            **cpu_info(),  # CPU model, instruction-set class and flags: they decide the training speed
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),  # read back from torch
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_json_atomic(out / METRICS_NAME, metrics)
    _plot(history, out / PLOT_NAME)
    log(f"test accuracy {test_acc:.4%} ({splits.test_x.shape[0]} images), training time {metrics['train_seconds']:.1f}s "
        f"(+ {prepare_seconds:.1f}s preparing the data)")
    log(f"wrote {ckpt_path}, {out / METRICS_NAME}, {out / PLOT_NAME}")
    return metrics

