"""MNIST's IDX files with numpy only (no torch): reading with header and length checked, and writing
(for synthetic data sets in tests and benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ferry.core.errors import FerryError

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: str | Path, expect_dims: int) -> np.ndarray:
    """An IDX file of uint8 data (uncompressed, or gzip-compressed as distributed) as an array of
    its declared shape."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise FerryError(f"{path} is a damaged gzip file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expect_dims:
        raise FerryError(f"{path} is not an MNIST IDX file of {expect_dims} dimension(s) (bad header)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expect_dims)]
    start = 4 + 4 * expect_dims
    if len(data) - start != math.prod(dims):
        raise FerryError(
            f"{path} is truncated or corrupt: header says {dims} ({math.prod(dims)} bytes), "
            f"file holds {len(data) - start}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array in MNIST's IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def missing_mnist_files(data_dir: str | Path) -> list[str]:
    raw = Path(data_dir) / "MNIST" / "raw"
    return [name for name in MNIST_FILES if not (raw / name).is_file()]


def _idx_file(folder: Path, name: str) -> Path:
    """`name` in `folder`, or `name.gz` (Debian's dataset packages ship them compressed)."""
    return folder / name if (folder / name).is_file() or not (folder / f"{name}.gz").is_file() else folder / f"{name}.gz"


def read_mnist(data_dir: str | Path, split: str, *, raw: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of split 'train' or 't10k' under
    data_dir/MNIST/raw, or under `raw` itself (any folder of MNIST-format files, e.g. Fashion-MNIST's)."""
    raw = Path(raw) if raw is not None else Path(data_dir) / "MNIST" / "raw"
    files = [_idx_file(raw, f"{split}-{kind}-idx{dims}-ubyte") for kind, dims in (("images", 3), ("labels", 1))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FerryError(f"MNIST-format files not found in {raw}: missing {', '.join(missing)}")
    x = read_idx(files[0], 3)
    y = read_idx(files[1], 1).astype(np.int64)
    if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
        raise FerryError(f"MNIST {split} files disagree: images {x.shape}, labels {y.shape}")
    return x, y


def write_mnist(root: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write images and labels in torchvision's MNIST layout under `root`; return `root`."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return Path(root)


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 stand-ins for digits: class k is a bright 6x6 block at the k-th of 10 positions,
    plus noise. Learnable in seconds; for tests and speed benchmarks, never for accuracy figures."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = 4 + 7 * (k // 4), 3 + 6 * (k % 4)
        x[i, r : r + 6, c : c + 6] = 255
    return x, y.astype(np.int64)
