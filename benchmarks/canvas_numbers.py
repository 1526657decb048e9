"""Whole numbers written on `ferry draw --detector`'s canvas, read by a detector through the app's own
path: how often the exact string is read.

Each number is four MNIST test digits (the test digits in order, four per number, so 1,000 numbers
use 4,000 different digits) written as strokes: each digit's skeleton (as in
`ferry.bench.canvas_fidelity`) drawn with the canvas's round pen at a pen width of 8-32 px, the
digits in a row on the number canvas at a random height (60-180 px), each a little taller or
shorter (0.85-1.1), with random gaps (0.15-0.5 of the height) and a wandering baseline (up to a
tenth of the height). `read_number` (what the app calls when a stroke ends) reads each, and the
string read is compared with the four digits. With --digits-model the app's two-stage reading is
measured (the detector boxes the digits, the digit model names each) and the detector alone beside it.

  python -m ferry.bench.canvas_numbers --model models/digits.onnx --data-dir data [--digits-model models/mnist-cnn.onnx]
      [--numbers 1000] [--split test|val] [--seed N] [--out FILE]

--split val writes the numbers from the 5,000 training digits `ferry train` holds out for validation
instead of the test digits: compare readers there, and read the test numbers once, for the reader
chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ferry.app.canvas import NUMBER_CANVAS, Stroke

DIGITS_PER_NUMBER = 4
HEIGHT = (60, 180)  # px: the digits' height on the canvas
PEN = (8, 32)  # px: the canvas's pen widths


def write_number(segments: list[np.ndarray], rng: np.random.Generator, canvas: tuple[int, int] = NUMBER_CANVAS
                 ) -> list[Stroke]:
    """The digits' skeletons (each (M, 2, 2) segments [[y0, x0], [y1, x1]]) as strokes in a row."""
    height = float(rng.uniform(*HEIGHT))
    pen = float(rng.uniform(*PEN))
    placed, x = [], 0.0
    for seg in segments:
        pts = seg.reshape(-1, 2)
        lo, hi = pts.min(0), pts.max(0)
        h = height * float(rng.uniform(0.85, 1.1))
        scale = h / max(float(hi[0] - lo[0]), 1e-6)
        dy = float(rng.uniform(-0.1, 0.1)) * height
        ys = (seg[..., 0] - lo[0]) * scale + dy
        xs = (seg[..., 1] - lo[1]) * scale + x
        placed.append((xs, ys))
        x += float((hi[1] - lo[1]) * scale) + float(rng.uniform(0.15, 0.5)) * height + pen
    all_x = np.concatenate([p[0].ravel() for p in placed])
    all_y = np.concatenate([p[1].ravel() for p in placed])
    width, tall = all_x.max() - all_x.min() + pen, all_y.max() - all_y.min() + pen
    fit = min(1.0, (canvas[0] - 20) / width, (canvas[1] - 20) / tall)
    left = float(rng.uniform(10, max(10.0, canvas[0] - 10 - width * fit)))
    top = float(rng.uniform(10, max(10.0, canvas[1] - 10 - tall * fit)))
    strokes = []
    for xs, ys in placed:
        xs = (xs - all_x.min()) * fit + left + pen * fit / 2
        ys = (ys - all_y.min()) * fit + top + pen * fit / 2
        strokes += [Stroke([(float(a), float(b)), (float(c), float(d))], width=pen * fit)
                    for (a, c), (b, d) in zip(xs, ys)]
    return strokes


class _Tally:
    """How one reader did: exact strings, digits right where the count was right, wrong counts, misses."""

    def __init__(self) -> None:
        self.exact = self.digits_right = self.wrong_length = self.numbers = 0
        self.misses: list[dict[str, Any]] = []

    def add(self, n: int, truth: str, text: str) -> None:
        self.numbers += 1
        self.exact += text == truth
        if len(text) == len(truth):
            self.digits_right += sum(a == b for a, b in zip(text, truth))
        else:
            self.wrong_length += 1
        if text != truth and len(self.misses) < 20:
            self.misses.append({"number": n, "truth": truth, "read": text})

    def result(self) -> dict[str, Any]:
        return {"exact": self.exact / max(1, self.numbers),
                "digits_right_where_length_right": self.digits_right / max(1, DIGITS_PER_NUMBER * (self.numbers - self.wrong_length)),
                "wrong_length": self.wrong_length, "first_misses": self.misses}


def measure_numbers(det, images: np.ndarray, labels: np.ndarray, *, numbers: int, seed: int = 0,
                    keep_examples: int = 0, digits=None, source: str = "MNIST test digits") -> dict[str, Any]:
    """Read `numbers` four-digit numbers made of consecutive digits of `images`; the exact-string rate.
    With `digits` (a digit classifier), the app's two-stage reading (the detector boxes, the classifier
    names) is the result, and the detector's own reading of the same drawings is `detector_alone`.
    `source` names the digits in the result's description of the writing."""
    from ferry.app.canvas import READ_SCORE, read_number
    from ferry.runtime.presets import EmptyImageError
    from ferry.train.strokes import skeleton_segments

    if numbers * DIGITS_PER_NUMBER > len(images):
        raise ValueError(f"{numbers} numbers need {numbers * DIGITS_PER_NUMBER} digits; {len(images)} given")
    rng = np.random.default_rng(seed)
    main, alone = _Tally(), _Tally()
    examples = []
    for n in range(numbers):
        idx = range(n * DIGITS_PER_NUMBER, (n + 1) * DIGITS_PER_NUMBER)
        truth = "".join(str(int(labels[i])) for i in idx)
        strokes = write_number([skeleton_segments(images[i]) for i in idx], rng)
        try:
            reading = read_number(det, strokes, digits=digits)
            text, by_detector = reading.text, reading.by_detector
        except EmptyImageError:
            text, by_detector, reading = "", "", None
        main.add(n, truth, text)
        if digits is not None:  # the same detection's own labels: the detector alone, run once
            alone.add(n, truth, by_detector)
        if reading is not None and len(examples) < keep_examples:
            examples.append((strokes, reading))
    result = {
        "numbers": numbers,
        **main.result(),
        "reader": f"{det.name} boxes, {digits.name} names" if digits is not None else f"{det.name} alone",
        "min_score": READ_SCORE,
        "seed": seed,
        "canvas": list(NUMBER_CANVAS),
        "writing": f"{DIGITS_PER_NUMBER} {source} per number (consecutive, none reused) as skeleton strokes; "
                   f"height {HEIGHT[0]}-{HEIGHT[1]} px, pen {PEN[0]}-{PEN[1]} px, gaps 0.15-0.5 of the height, "
                   "baseline +-0.1",
        "path": "ferry.app.canvas.read_number (what ferry draw --detector calls when a stroke ends)",
    }
    if digits is not None:
        result["detector_alone"] = alone.result()
    if keep_examples:
        result["_examples"] = examples
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/digits.onnx", help="an exported digit detector")
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--numbers", type=int, default=1000, help="four-digit numbers to read (default: 1000)")
    parser.add_argument("--digits-model", help="a digit classifier (mnist-cnn) to name the digits the detector boxes, "
                                               "as `ferry draw --detector D --model M` does; the detector alone is measured too")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test: MNIST's test digits (default); val: the 5,000 training digits ferry train holds out")
    parser.add_argument("--seed", type=int, default=0, help="the writing's random seed (default: 0)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.core.idx import read_mnist
    from ferry.core.machine import cpu_info
    from ferry.runtime.classifier import Classifier
    from ferry.runtime.detector import Detector

    try:
        if args.split == "val":
            from ferry.bench.canvas_fidelity import read_mnist_validation

            (images, labels), source = read_mnist_validation(args.data_dir), "held-out MNIST training digits"
        else:
            (images, labels), source = read_mnist(args.data_dir, "t10k"), "MNIST test digits"
        det = Detector.from_onnx(args.model, provider="cpu")
        digits = Classifier.from_onnx(args.digits_model, provider="cpu") if args.digits_model else None
        result = measure_numbers(det, images, labels, numbers=args.numbers, seed=args.seed, digits=digits, source=source)
    except (OSError, ValueError, FerryError) as exc:
        print(f"canvas_numbers: error: {exc}", file=sys.stderr)
        return 2
    result.update(model=str(Path(args.model)), digits_model=args.digits_model, split=args.split, machine=cpu_info())
    det_name = Path(args.model).stem
    for name, r in ([(f"{det_name} alone", result["detector_alone"])] if "detector_alone" in result else []) + [(result["reader"], result)]:
        print(f"{result['numbers']} four-digit numbers written on the canvas, {name}: exact string read {r['exact']:.2%}; "
              f"{r['wrong_length']} read with a wrong number of digits; digits right where the length was right "
              f"{r['digits_right_where_length_right']:.2%}")
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
