"""Shared fixtures: real MNIST location (FERRY_MNIST_DIR), synthetic data and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST folder from $FERRY_MNIST_DIR; tests using it skip with the reason when absent."""
    env = os.environ.get("FERRY_MNIST_DIR")
    if not env:
        pytest.skip("real MNIST not configured: set FERRY_MNIST_DIR to a folder holding MNIST/raw/*-ubyte")
    path = Path(env)
    raw = path / "MNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        pytest.skip(f"real MNIST absent from {raw}: missing {', '.join(missing)}")
    return path


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images: class k is a bright 6x6 block at the k-th of 10 positions, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = 4 + 7 * (k // 4), 3 + 6 * (k % 4)
        x[i, r : r + 6, c : c + 6] = 255
    return x, y.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in MNIST's IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    """A folder in torchvision's MNIST layout holding synthetic digits (1,200 train, 300 test)."""
    raw = tmp_path / "fake" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    tx, ty = synthetic_digits(1200, seed=1)
    vx, vy = synthetic_digits(300, seed=2)
    write_idx(raw / "train-images-idx3-ubyte", tx)
    write_idx(raw / "train-labels-idx1-ubyte", ty)
    write_idx(raw / "t10k-images-idx3-ubyte", vx)
    write_idx(raw / "t10k-labels-idx1-ubyte", vy)
    return tmp_path / "fake"


def run_ferry(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `ferry` CLI in a subprocess (as a user would) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "ferry", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A clear error: non-zero exit, no traceback, a one-line message containing each needle."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert err_lines, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"


@pytest.fixture(scope="session")
def real_mnist_run(mnist_dir, tmp_path_factory):
    """One short training run on real MNIST (1 epoch, 12,000 images), shared by the tests that need it.
    Returns (checkpoint path, metrics)."""
    from train.config import TrainConfig
    from train.trainer import train

    out = tmp_path_factory.mktemp("real_mnist")
    cfg = TrainConfig(data_dir=str(mnist_dir), out=str(out), epochs=1, train_limit=12000, device="cpu")
    metrics = train(cfg, progress=False, log=lambda _m: None)
    return out / "checkpoint.pt", metrics
