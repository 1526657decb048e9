"""Reading MNIST's IDX files with numpy only (no torch), header and length checked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from runtime.errors import FerryError


def read_idx(path: str | Path, expect_dims: int) -> np.ndarray:
    """An uncompressed IDX file of uint8 data as an array of its declared shape."""
    path = Path(path)
    data = path.read_bytes()
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
