"""Runtime overhead: `Classifier` end to end (decoded image -> labels) against `session.run` on a
prepared tensor, on the CPU at batch 1. The two are timed in interleaved rounds so that machine
noise hits both alike; the overhead is the median of the per-round ratios, with its ~95% interval."""

from __future__ import annotations

import gc
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


# The runtime's own work at batch 1 (preprocessing a decoded input, softmax, labels), as a share of
# the engine's call: the bounds the report checks.
BOUNDS = {"mnist-cnn": 0.25, "resnet50": 0.05}


def _overhead(path: Path, model: str, image, *, rounds: int, per_round: int, threads: int | None) -> dict[str, Any]:
    from ferry.bench.harness import measure_interleaved
    from ferry.runtime.classifier import Classifier

    clf = Classifier.from_onnx(path, provider="cpu", threads=threads)
    prepared = clf.prepare(image)[None]
    feed = {clf.input_name: prepared}

    def raw():
        clf.session.run([clf.output_name], feed)

    def end_to_end():
        clf.predict(image, top_k=5)

    result = measure_interleaved({"session.run": raw, "Classifier.predict": end_to_end}, batch_size=1, warmup=5,
                                 round_seconds=0.05, min_rounds=max(8, rounds // 4), max_seconds=30 if model == "mnist-cnn" else 60,
                                 pairs=[("Classifier.predict", "session.run")], target=0.02)
    ratio, lo, hi = result.ratio("Classifier.predict", "session.run")
    p_raw = percentile(result.latencies["session.run"], 50)
    p_e2e = percentile(result.latencies["Classifier.predict"], 50)
    bound = BOUNDS.get(model)
    return {
        "model": model,
        "provider": clf.provider.used,
        "input": f"{image.size[0]}x{image.size[1]} {image.mode} image" if isinstance(image, Image.Image)
                 else f"{image.shape[1]}x{image.shape[0]} uint8 array",
        "session_run_p50_ms": 1e3 * p_raw,
        "classifier_p50_ms": 1e3 * p_e2e,
        "overhead": ratio - 1,
        "overhead_ci": [lo - 1, hi - 1],
        "rounds": result.rounds,
        "bound": bound,
        "within_bound": None if bound is None else bool(ratio - 1 <= bound),
        "calls_each": len(result.latencies["session.run"]),
        "threads": clf.provider.threads,
    }
