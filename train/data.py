"""MNIST loading (torchvision's layout), the train/validation split and fast in-memory batching.

The whole data set lives in memory as uint8 tensors (60,000 x 28 x 28 is 47 MB); batches are
normalized and augmented as tensors, which on a 2-core CPU is much faster than per-sample PIL
transforms through a DataLoader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ferry.core.errors import FerryError
from ferry.core.idx import missing_mnist_files, read_mnist
from ferry.runtime.presets import MNIST_MEAN, MNIST_STD

# The validation split is fixed (independent of --seed) so runs with different seeds are comparable.
SPLIT_SEED = 20240531


@dataclass
class MnistSplits:
    train_x: torch.Tensor  # (N, 28, 28) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_mnist_arrays(data_dir: str | Path, *, download: bool = False) -> tuple[torch.Tensor, ...]:
    """Return (train_x, train_y, test_x, test_y) from `data_dir/MNIST/raw`.

    When files are missing and `download` is true (and $FERRY_NO_DOWNLOAD is unset), try
    torchvision's downloader first; if that fails (no network), raise a FerryError naming the missing files and how to get them.
    """
    data_dir = Path(data_dir)
    missing = missing_mnist_files(data_dir)
    if missing and download and not os.environ.get("FERRY_NO_DOWNLOAD"):
        try:
            from torchvision.datasets import MNIST

            MNIST(str(data_dir), train=True, download=True)
            MNIST(str(data_dir), train=False, download=True)
        except Exception:  # noqa: BLE001 - any download failure becomes the message below
            pass
        missing = missing_mnist_files(data_dir)
    if missing:
        raise FerryError(
            f"MNIST not found in {data_dir}/MNIST/raw: missing {', '.join(missing)}. "
            "Get them with `python -c \"import torchvision; torchvision.datasets.MNIST('"
            f"{data_dir}', download=True)\"` (needs the network), or point --data-dir at a folder "
            "that has MNIST/raw/*-ubyte"
        )
    (train_x, train_y), (test_x, test_y) = (read_mnist(data_dir, split) for split in ("train", "t10k"))
    train_x, test_x = torch.from_numpy(train_x.copy()), torch.from_numpy(test_x.copy())
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    return train_x, train_y, test_x, test_y


def split(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    val_size: int,
    train_limit: int = 0,
) -> MnistSplits:
    """Hold out `val_size` training images (a fixed random choice) for validation."""
    n = train_x.shape[0]
    if val_size >= n:
        raise FerryError(f"--val-size {val_size} leaves no training images (the set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, tr_idx = perm[:val_size], perm[val_size:]
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    return MnistSplits(train_x[tr_idx], train_y[tr_idx], train_x[val_idx], train_y[val_idx], test_x, test_y)


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32, scaled to [0, 1] then standardized."""
    return ((x_uint8.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: float = 2.0,
    max_rotate_deg: float = 10.0,
    max_scale: float = 0.1,
) -> torch.Tensor:
    """Apply a random small affine transform to each image of a normalized (N, 1, H, W) batch.

    Shifts up to `max_shift` pixels, rotations up to `max_rotate_deg`, scales within
    1 +- `max_scale`. The background is filled with the normalized value of a 0 pixel.
    """
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(max_rotate_deg)
    scale = 1 + u[:, 1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[:, 2] * max_shift * 2 / w], dim=1),
            torch.stack([sin, cos, u[:, 3] * max_shift * 2 / h], dim=1),
        ],
        dim=1,
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = -MNIST_MEAN / MNIST_STD
    out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + background


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) mini-batches, shuffled with `generator` when asked."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size
