"""Canvas fidelity: MNIST test digits as people draw them on `ferry draw`'s canvas, read through the
app's own path, next to the accuracy on the original 28x28 images.

Strokes, not bitmaps: each digit's skeleton (scikit-image, traced on a 4x upscaled copy) becomes
pen strokes, drawn with the canvas's own round pen (`render_strokes`) at several pen widths, at a
random size and position, then read by `predict_strokes`, exactly what the app does when a stroke
ends. Accuracy is reported per pen width and overall; the bitmap row (upscaled MNIST pasted onto
the canvas) is kept for comparison.

  python -m ferry.bench.canvas_fidelity --model models/mnist-cnn.onnx --data-dir data [--split test|val] [--limit N] [--out FILE]

--split val reads the 5,000 digits `ferry train` holds out for validation instead of the test digits:
compare recipes there, and read the test digits once, for the recipe chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferry.app.canvas import CANVAS_SIZE, Stroke, predict_canvas_image, predict_strokes, render_strokes
from ferry.train.strokes import skeleton_segments

PEN_WIDTHS = (8, 13, 18, 25, 32)  # the app's pen goes from 6 to 36 px; 18 is its default
EXTENT = (0.35, 0.9)  # the drawn digit's larger side, as a share of the canvas


def read_mnist_test(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The official test images and labels (numpy only, no torch)."""
    from ferry.core.idx import read_mnist

    return read_mnist(data_dir, "t10k")


def read_mnist_validation(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 training images `ferry train` holds out for validation (its fixed split): the digits
    to compare recipes on, so that the test digits are read once, at the end."""
    from ferry.core.idx import read_mnist
    from ferry.train.config import TrainConfig
    from ferry.train.data import split_indices

    x, y = read_mnist(data_dir, "train")
    val_idx, _ = split_indices(len(x), TrainConfig().val_size)
    return x[val_idx.numpy()], y[val_idx.numpy()]


def draw_as_strokes(segments: np.ndarray, rng: np.random.Generator, *, pen: float,
                    canvas: int = CANVAS_SIZE) -> tuple[list[Stroke], dict[str, float]]:
    """Place the skeleton at a random size (its larger side EXTENT of the canvas) and position, with
    the whole pen inside the canvas, as strokes of width `pen`."""
    pts = segments.reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    extent = float(rng.uniform(*EXTENT)) * canvas
    scale = (extent - pen) / max(float((hi - lo).max()), 1e-6)
    span = (hi - lo) * scale + pen
    top = float(rng.uniform(0, canvas - span[0]))
    left = float(rng.uniform(0, canvas - span[1]))
    ys = (segments[..., 0] - lo[0]) * scale + top + pen / 2
    xs = (segments[..., 1] - lo[1]) * scale + left + pen / 2
    strokes = [Stroke([(float(x0), float(y0)), (float(x1), float(y1))], width=pen)
               for (y0, y1), (x0, x1) in zip(ys, xs)]
    return strokes, {"extent": extent, "top": top, "left": left}


def to_canvas(digit: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS_SIZE) -> tuple[Image.Image, dict]:
    """The bitmap row: a 28x28 light-on-dark digit as dark ink on the white canvas, scaled to a random
    size between a third of the canvas and all of it, at a random position."""
    size = int(rng.integers(canvas // 3, canvas + 1))
    left = int(rng.integers(0, canvas - size + 1))
    top = int(rng.integers(0, canvas - size + 1))
    page = Image.new("L", (canvas, canvas), 255)
    page.paste(Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR), (left, top))
    return page, {"size": size, "left": left, "top": top}


def measure_fidelity(clf, images: np.ndarray, labels: np.ndarray, *, seed: int = 0, pen_widths=PEN_WIDTHS,
                     progress=None) -> dict[str, Any]:
    """Every digit drawn at every pen width (and once as a bitmap), read through the app's path.
    "draw a digit" (no ink found) counts as a miss."""
    from ferry.runtime.presets import EmptyImageError

    rng = np.random.default_rng(seed)
    correct = {w: 0 for w in pen_widths}
    as_image = {w: 0 for w in pen_widths}
    bitmap_correct = empty = 0
    for i, (digit, label) in enumerate(zip(images, labels)):
        segments = skeleton_segments(digit)
        for w in pen_widths:
            strokes, _ = draw_as_strokes(segments, rng, pen=w)
            try:
                correct[w] += int(predict_strokes(clf, strokes, top_k=1).index == label)
                # the same drawing as a plain image (the person's pen, no stroke information): what
                # `ferry predict` sees of a screenshot or a scan of it
                as_image[w] += int(predict_canvas_image(clf, render_strokes(strokes), top_k=1).index == label)
            except EmptyImageError:
                empty += 1
        page, _ = to_canvas(digit, rng)
        try:
            bitmap_correct += int(predict_canvas_image(clf, page, top_k=1).index == label)
        except EmptyImageError:
            empty += 1
        if progress and i % 500 == 0:
            progress(i)
    direct = clf.run(np.stack([clf.prepare(d) for d in images]))
    n = len(labels)
    per_pen = {str(w): correct[w] / n for w in pen_widths}
    return {
        "images": n,
        "stroke_accuracy": sum(correct.values()) / (n * len(pen_widths)),
        "stroke_accuracy_per_pen_width": per_pen,
        "image_accuracy": sum(as_image.values()) / (n * len(pen_widths)),
        "image_accuracy_per_pen_width": {str(w): as_image[w] / n for w in pen_widths},
        "bitmap_accuracy": bitmap_correct / n,
        "direct_accuracy": float((direct.argmax(1) == labels).mean()),
        "not_recognised_as_digit": empty,
        "seed": seed,
        "canvas": CANVAS_SIZE,
        "strokes": f"skeleton (4x upscaled) traced with the canvas's round pen; pen widths {list(pen_widths)} px; "
                   f"digit extent {EXTENT[0]:.0%}-{EXTENT[1]:.0%} of the canvas, random position",
        "bitmap": f"upscaled MNIST pasted at {CANVAS_SIZE // 3}-{CANVAS_SIZE} px, random position",
        "path": "strokes: ferry.app.canvas.predict_strokes (what ferry draw calls when a stroke ends: the strokes "
                "redrawn with an MNIST-like pen); image: the drawing with the person's pen as a plain image",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mnist-cnn.onnx")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test: the 10,000 MNIST test digits; val: the 5,000 training digits ferry train holds out")
    parser.add_argument("--limit", type=int, default=0, help="first N digits only (0: all)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import cpu_info
    from ferry.runtime.classifier import Classifier

    try:
        images, labels = (read_mnist_test if args.split == "test" else read_mnist_validation)(args.data_dir)
        clf = Classifier.from_onnx(args.model, provider="cpu")
    except (OSError, FerryError) as exc:
        print(f"canvas_fidelity: error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    result = measure_fidelity(clf, images, labels, progress=lambda i: print(f"  {i}/{len(labels)}", file=sys.stderr))
    result.update(model=str(args.model), split=args.split, machine=cpu_info())
    per_pen = ", ".join(f"{w} px {100 * a:.2f}%" for w, a in result["stroke_accuracy_per_pen_width"].items())
    per_pen_image = ", ".join(f"{w} px {100 * a:.2f}%" for w, a in result["image_accuracy_per_pen_width"].items())
    print(f"canvas, {result['images']} MNIST {'test' if args.split == 'test' else 'validation'} digits drawn as strokes at pen widths {list(PEN_WIDTHS)} px:\n"
          f"  app path (strokes, normalized pen) {result['stroke_accuracy']:.2%} ({per_pen})\n"
          f"  as plain images (the person's pen)  {result['image_accuracy']:.2%} ({per_pen_image})\n"
          f"  bitmaps pasted on the canvas       {result['bitmap_accuracy']:.2%}; the original 28x28 images {result['direct_accuracy']:.2%}")
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
