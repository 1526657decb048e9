"""Training plots as PNG (matplotlib, Agg backend, written atomically): loss and accuracy curves,
and a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ferry.core.fileio import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_curves(history: list[dict], path: str | Path, *, title: str = "DigitCNN on MNIST") -> None:
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", color="tab:green", label="validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> None:
    """Rows: true class; columns: predicted. Cells show counts; colour is the row's share."""
    plt = _pyplot()
    n = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_detection_curves(history: list[dict], path: str | Path, *, title: str = "") -> None:
    """A detector's training loss and validation mAP per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss (sum)")
    for key in sorted({k for r in history for k in r.get("losses", {}) if k != "loss"}):
        ax_loss.plot(epochs, [r["losses"].get(key) for r in history], ".--", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_map.plot(epochs, [100 * (r["val_map50"] or 0) for r in history], "o-", label="validation mAP@0.5")
    ax_map.plot(epochs, [100 * (r["val_map"] or 0) for r in history], "o-", label="validation mAP@[.5:.95]")
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("mAP (%)")
    ax_map.legend()
    ax_map.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
