"""A random-weight model set for speed work (speed does not depend on the weights): the digit CNN
and ResNet-50 exported to fp32, int8 and fp16 like `make demo` does, without MNIST or a download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def build_random_models(root: str | Path, *, log: Callable[[str], None] = lambda _m: None) -> Path:
    """Write <root>/models/{mnist-cnn,resnet50}{,.int8,.fp16}.onnx and return that folder."""
    import torch
    from PIL import Image

    from ferry.core.idx import synthetic_digits, write_mnist
    from ferry.export.pipeline import ExportOptions, export_model
    from ferry.models.digit_cnn import DigitCNN
    from ferry.train.config import TrainConfig
    from ferry.train.trainer import make_optimizer, save_checkpoint

    root = Path(root)
    torch.manual_seed(0)
    cfg = TrainConfig(out=str(root / "cnn"))
    model = DigitCNN()
    ckpt = root / "cnn" / "checkpoint.pt"
    save_checkpoint(ckpt, model=model, optimizer=make_optimizer(model, cfg), cfg=cfg, epoch=0, history=[])
    write_mnist(root / "mnist", synthetic_digits(300), synthetic_digits(300))
    models = root / "models"
    export_model(ExportOptions(model="mnist-cnn", out=str(models), checkpoint=str(ckpt), data_dir=str(root / "mnist"),
                               int8=True, fp16=True, int8_max_drop_pp=100.0, calib_images=300), log=log)
    calib = root / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    export_model(ExportOptions(model="resnet50", weights="none", out=str(models), int8=True, fp16=True,
                               calib_dir=str(calib)), log=log)
    return models
