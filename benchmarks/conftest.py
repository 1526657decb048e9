"""Fixtures for the pytest-benchmark suite (`pytest benchmarks/`; not part of `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def _build_models(root: Path) -> Path:
    """Random-weight models (speed does not depend on the weights): CNN and ResNet-50, fp32 + int8."""
    from PIL import Image

    from export.pipeline import ExportOptions, export_model
    from train.config import TrainConfig
    from train.model import DigitCNN
    from train.trainer import make_optimizer, save_checkpoint
    from tests.conftest import synthetic_digits, write_fake_mnist
    import torch

    torch.manual_seed(0)
    cfg = TrainConfig(out=str(root / "cnn"))
    model = DigitCNN()
    ckpt = root / "cnn" / "checkpoint.pt"
    save_checkpoint(ckpt, model=model, optimizer=make_optimizer(model, cfg), cfg=cfg, epoch=0, history=[])
    write_fake_mnist(root / "mnist", synthetic_digits(300), synthetic_digits(300))
    models = root / "models"
    export_model(ExportOptions(model="mnist-cnn", out=str(models), checkpoint=str(ckpt), data_dir=str(root / "mnist"),
                               int8=True, fp16=True, int8_max_drop_pp=100.0, calib_images=300), log=lambda _m: None)
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    export_model(ExportOptions(model="resnet50", weights="none", out=str(models), int8=True, fp16=True,
                               calib_dir=str(calib)), log=lambda _m: None)
    return models


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """$FERRY_MODELS_DIR (e.g. the `models/` that `make demo` writes), else random-weight exports."""
    env = os.environ.get("FERRY_MODELS_DIR")
    if env:
        return Path(env)
    return _build_models(tmp_path_factory.mktemp("bench"))
