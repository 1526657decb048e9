"""MNIST loading (torchvision's layout), the train/validation split and fast in-memory batching.

The whole data set lives in memory as uint8 tensors (60,000 x 28 x 28 is 47 MB); batches are
normalized and augmented as tensors, which on a 2-core CPU is much faster than per-sample PIL
transforms through a DataLoader.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    train_pen: torch.Tensor | None = None  # (N, 56, 56) uint8 `pen_distances` of train_x, for redraw_with_pen


def load_mnist_arrays(data_dir: str | Path, *, download: bool = False) -> tuple[torch.Tensor, ...]:
    """Return (train_x, train_y, test_x, test_y) from `data_dir/MNIST/raw`.

    When files are missing and `download` is true (and $FERRY_NO_DOWNLOAD is unset), try
    torchvision's downloader first; if that fails (no network), raise a FerryError naming the missing files and how to get them.
    """
    data_dir = Path(data_dir)
    missing = missing_mnist_files(data_dir)
    tried = ""
    if missing and download and not os.environ.get("FERRY_NO_DOWNLOAD"):
        made = [d for d in (data_dir, data_dir / "MNIST", data_dir / "MNIST" / "raw") if not d.exists()]
        try:
            from torchvision.datasets import MNIST

            MNIST(str(data_dir), train=True, download=True)
            MNIST(str(data_dir), train=False, download=True)
        except Exception as exc:  # noqa: BLE001 - any download failure becomes the message below
            tried = f"a download was tried and failed ({type(exc).__name__}). "
        missing = missing_mnist_files(data_dir)
        if missing:  # the folders the downloader made, if it left them empty: a typo in --data-dir leaves nothing
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
    if missing:
        raise FerryError(
            f"MNIST not found in {data_dir}/MNIST/raw: missing {', '.join(missing)}. {tried}"
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
    val_idx, tr_idx = split_indices(n, val_size)
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    return MnistSplits(train_x[tr_idx], train_y[tr_idx], train_x[val_idx], train_y[val_idx], test_x, test_y)


def split_indices(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices into the `n` MNIST training images: the fixed split of `split`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:val_size], perm[val_size:]


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32, scaled to [0, 1] then standardized."""
    return standardize(to_unit(x_uint8))


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32 in [0, 1] (ink 1, background 0)."""
    return (x_uint8.float() / 255.0).unsqueeze(1)


def standardize(x_unit: torch.Tensor) -> torch.Tensor:
    return (x_unit - MNIST_MEAN) / MNIST_STD


SKELETON_SCALE = 2  # skeletons are traced at twice MNIST's resolution: smooth centre lines, not 28x28 staircases


def skeletons(x_uint8: torch.Tensor) -> torch.Tensor:
    """The one-pixel centre lines of (N, 28, 28) uint8 digits, traced on a bicubic 2x upscale (scikit-image's
    skeletonize of the ink above 40%), as (N, 56, 56) uint8 0/1: the strokes a pen would trace. Its
    cost is part of `prepare_seconds` in metrics.json."""
    from skimage.morphology import skeletonize

    out = np.zeros((x_uint8.shape[0], 28 * SKELETON_SCALE, 28 * SKELETON_SCALE), dtype=np.uint8)
    for start in range(0, x_uint8.shape[0], 4096):  # bounded memory for the float upscale
        chunk = x_uint8[start : start + 4096].float().unsqueeze(1)
        big = F.interpolate(chunk, scale_factor=SKELETON_SCALE, mode="bicubic", align_corners=False)[:, 0].numpy()
        for i, ink in enumerate(big > 0.4 * 255):
            out[start + i] = skeletonize(ink)
    return torch.from_numpy(out)


PEN_RADII = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)  # at 2x: pens 1.5 to 5 px wide in the 28x28 image


def pen_distances(x_uint8: torch.Tensor) -> torch.Tensor:
    """For each pixel of the 2x `skeletons` of (N, 28, 28) uint8 digits, its squared distance to the
    nearest skeleton pixel (in 2x pixels, capped at 255), as (N, 56, 56) uint8: a round pen of radius
    r drawn along the skeleton covers exactly the pixels with a value <= r^2. Computed once per run, so
    drawing a batch is one comparison."""
    return squared_distances(skeletons(x_uint8))


def squared_distances(skel: torch.Tensor) -> torch.Tensor:
    """(N, H, W) 0/1 skeletons -> each pixel's squared distance to the nearest skeleton pixel, capped
    at 255, as uint8 (255 everywhere for an empty skeleton)."""
    from scipy.ndimage import distance_transform_edt

    out = np.empty(tuple(skel.shape), dtype=np.uint8)
    for i, s in enumerate(skel.numpy()):
        d = distance_transform_edt(s == 0) if s.any() else np.full(s.shape, 255.0)
        out[i] = np.minimum(np.rint(d * d), 255)  # squared distances between pixel centres are integers
    return torch.from_numpy(out)


def redraw_with_pen(pen: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Digits drawn again along their skeletons with a round pen of constant, random width (1.5 to
    5 pixels of the 28x28 image), as a person draws on the canvas; then framed like MNIST (ink
    fitted into a 20x20 box, centred by mass in 28x28) with the ink's peak at 1, as the runtime
    prepares a drawing. `pen`: (N, 1, 56, 56) from `pen_distances`; returns (N, 1, 28, 28)."""
    n = pen.shape[0]
    pick = torch.randint(0, len(PEN_RADII), (n,), generator=generator).to(pen.device)
    radius2 = torch.tensor([r * r for r in PEN_RADII], device=pen.device)[pick]
    ink = (pen.float() <= radius2.view(n, 1, 1, 1)).float()
    framed = frame_like_mnist(F.avg_pool2d(ink, SKELETON_SCALE))
    return framed / framed.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


def frame_like_mnist(x: torch.Tensor, box: float = 20.0) -> torch.Tensor:
    """Scale each [0, 1] (N, 1, 28, 28) image so its ink fits a `box` x `box` square and move its
    centre of mass to the centre, as the MNIST digits were prepared (and as the runtime prepares
    canvas drawings)."""
    n, _, h, w = x.shape
    ink = x > 0.1
    rows, cols = ink.any(dim=3).squeeze(1), ink.any(dim=2).squeeze(1)
    idx_h, idx_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    big = torch.tensor(10_000, device=x.device)
    top, bottom = torch.where(rows, idx_h, big).min(1).values, torch.where(rows, idx_h, -big).max(1).values
    left, right = torch.where(cols, idx_w, big).min(1).values, torch.where(cols, idx_w, -big).max(1).values
    extent = torch.maximum(bottom - top + 1, right - left + 1).clamp(min=1).float()
    scale = (box / extent).clamp(0.5, 3.0)
    mass = x.sum(dim=(1, 2, 3)).clamp(min=1e-6)
    cy = (x.sum(dim=3).squeeze(1) * idx_h).sum(1) / mass
    cx = (x.sum(dim=2).squeeze(1) * idx_w).sum(1) / mass
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([1 / scale, zero, (2 * cx + 1) / w - 1], 1),
                         torch.stack([zero, 1 / scale, (2 * cy + 1) / h - 1], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_width_jitter(x: torch.Tensor, generator: torch.Generator, *, p: float) -> torch.Tensor:
    """Thicken or thin the strokes of a [0, 1] (N, 1, H, W) batch, as pens and people vary: with
    probability `p` an image is dilated by one or two pixels or eroded by one, at twice the
    resolution (so a step is half a pixel of the 28x28 image), then brought back to size."""
    if p <= 0:
        return x
    n = x.shape[0]
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    thick1 = F.max_pool2d(up, 3, stride=1, padding=1)
    variants = torch.stack([
        up,
        -F.max_pool2d(-up, 3, stride=1, padding=1),  # erode: thinner
        thick1,  # dilate: thicker
        F.max_pool2d(thick1, 3, stride=1, padding=1),  # dilate twice: a broad pen
    ])
    u = torch.rand(n, generator=generator)  # random numbers come from the CPU generator on every device
    kind = torch.where(u < p, 1 + (torch.rand(n, generator=generator) * 3).long().clamp(max=2), torch.zeros(n, dtype=torch.long))
    picked = variants[kind.to(x.device), torch.arange(n, device=x.device)]
    return F.avg_pool2d(picked, 2)


def random_warp(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: float = 2.0,
    max_rotate_deg: float = 10.0,
    max_scale: float = 0.1,
    elastic_px: float = 0.0,
) -> torch.Tensor:
    """A random small affine transform of each image of a [0, 1] (N, 1, H, W) batch (shifts up to
    `max_shift` pixels, rotations up to `max_rotate_deg`, scales within 1 +- `max_scale`), plus, with
    `elastic_px` > 0, a smooth elastic distortion of up to about that many pixels (a random 4x4
    displacement field, upsampled): the wobble of a hand-drawn line. One grid_sample for both."""
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
    if elastic_px > 0:
        coarse = torch.randn(n, 2, 4, 4, generator=generator) * (elastic_px / 2)
        field = F.interpolate(coarse.to(x.device), size=(h, w), mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1) * torch.tensor([2 / w, 2 / h], device=x.device)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
    for idx in batch_indices(x.shape[0], batch_size=batch_size, generator=generator, shuffle=shuffle, drop_last=drop_last):
        yield x[idx], y[idx]


def batch_indices(n: int, *, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size
