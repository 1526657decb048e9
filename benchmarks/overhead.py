"""Runtime overhead: `Classifier` end to end (decoded image -> labels) against `session.run` on a
prepared tensor, on the CPU at batch 1. The two are timed in alternating rounds so that machine
noise hits both alike; medians are compared."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferry.bench.harness import percentile


def _sample_photo() -> Image.Image:
    """A real photo shipped with ferry (coffee.jpg, 400x267)."""
    from ferry.core.samples import samples_dir

    with Image.open(samples_dir() / "photos" / "coffee.jpg") as img:
        return img.convert("RGB")


def _sample_digit() -> np.ndarray:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    digit[6:9, 9:13] = 255
    return digit


def _alternate(a, b, *, rounds: int, per_round: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((a, ta), (b, tb)):
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    return ta, tb


def measure_overhead(models_dir: str | Path, *, threads: int | None = None) -> list[dict[str, Any]]:
    rows = []
    # (model, input, rounds, calls per round): strict A/B alternation for ResNet-50
    cases = (("resnet50", _sample_photo(), 60, 1), ("mnist-cnn", _sample_digit(), 20, 50))
    for model, image, rounds, per_round in cases:
        path = Path(models_dir) / f"{model}.onnx"
        if path.exists():
            rows.append(_overhead(path, model, image, rounds=rounds, per_round=per_round, threads=threads))
            gc.collect()  # its session is gone before the next one is made: one live session at a time
    return rows


def _overhead(path: Path, model: str, image, *, rounds: int, per_round: int, threads: int | None) -> dict[str, Any]:
    from ferry.runtime.classifier import Classifier

    clf = Classifier.from_onnx(path, provider="cpu", threads=threads)
    prepared = clf.prepare(image)[None]
    feed = {clf.input_name: prepared}

    def raw():
        clf.session.run([clf.output_name], feed)

    def end_to_end():
        clf.predict(image, top_k=5)

    for _ in range(3):
        raw()
        end_to_end()
    t_raw, t_e2e = _alternate(raw, end_to_end, rounds=rounds, per_round=per_round)
    p_raw, p_e2e = percentile(t_raw, 50), percentile(t_e2e, 50)
    return {
        "model": model,
        "provider": clf.provider.used,
        "input": f"{image.size[0]}x{image.size[1]} {image.mode} image" if isinstance(image, Image.Image)
                 else f"{image.shape[1]}x{image.shape[0]} uint8 array",
        "session_run_p50_ms": 1e3 * p_raw,
        "classifier_p50_ms": 1e3 * p_e2e,
        "overhead": p_e2e / p_raw - 1,
        "calls_each": len(t_raw),
        "threads": clf.provider.threads,
    }
