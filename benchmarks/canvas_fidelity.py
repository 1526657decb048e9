"""Canvas fidelity: MNIST test digits redrawn as canvas drawings (black ink on the 280x280 white
canvas, at varied sizes and positions) and sent through `ferry draw`'s own canvas-to-prediction
path. Reports accuracy next to the accuracy on the original 28x28 images.

  python -m ferry.bench.canvas_fidelity --model models/mnist-cnn.onnx --data-dir data [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferry.app.canvas import CANVAS_SIZE, predict_canvas_image


def read_mnist_test(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The official test images and labels (numpy only, no torch)."""
    from ferry.core.idx import read_mnist

    return read_mnist(data_dir, "t10k")


def to_canvas(digit: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS_SIZE) -> tuple[Image.Image, dict]:
    """A 28x28 light-on-dark digit as dark ink on a white canvas: scaled to a random size between
    a third of the canvas and all of it, placed at a random position (wholly on the canvas)."""
    size = int(rng.integers(canvas // 3, canvas + 1))
    left = int(rng.integers(0, canvas - size + 1))
    top = int(rng.integers(0, canvas - size + 1))
    page = Image.new("L", (canvas, canvas), 255)
    page.paste(Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR), (left, top))
    return page, {"size": size, "left": left, "top": top}


def measure_fidelity(clf, images: np.ndarray, labels: np.ndarray, *, seed: int = 0, progress=None) -> dict[str, Any]:
    from ferry.runtime.presets import EmptyImageError

    rng = np.random.default_rng(seed)
    canvas_correct = empty = 0
    for i, (digit, label) in enumerate(zip(images, labels)):
        page, _ = to_canvas(digit, rng)
        try:
            canvas_correct += int(predict_canvas_image(clf, page, top_k=1).index == label)
        except EmptyImageError:  # "draw a digit" on a faint digit counts as wrong
            empty += 1
        if progress and i % 500 == 0:
            progress(i)
    direct = clf.run(np.stack([clf.prepare(d) for d in images]))
    direct_correct = int((direct.argmax(1) == labels).sum())
    n = len(labels)
    return {"images": n, "canvas_accuracy": canvas_correct / n, "direct_accuracy": direct_correct / n,
            "not_recognised_as_digit": empty, "seed": seed, "canvas": CANVAS_SIZE,
            "sizes": f"{CANVAS_SIZE // 3}-{CANVAS_SIZE} px, random positions"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mnist-cnn.onnx")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only (0: all 10,000)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.runtime.classifier import Classifier

    try:
        images, labels = read_mnist_test(args.data_dir)
        clf = Classifier.from_onnx(args.model, provider="cpu")
    except (OSError, FerryError) as exc:
        print(f"canvas_fidelity: error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    result = measure_fidelity(clf, images, labels, progress=lambda i: print(f"  {i}/{len(labels)}", file=sys.stderr))
    result["model"] = str(args.model)
    print(f"canvas accuracy {result['canvas_accuracy']:.2%} vs direct {result['direct_accuracy']:.2%} "
          f"on {result['images']} MNIST test digits drawn on the {CANVAS_SIZE}x{CANVAS_SIZE} canvas")
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
