"""Real images as a class folder, for fine-tuning runs and tests: MNIST or Fashion-MNIST (Debian's
dataset-fashion-mnist package) written out as PNG files, DATA/train/<class>/ and DATA/val/<class>/,
converted to RGB as photos would be.

  python -m ferry.bench.datasets fashion-mnist --out data/fashion --train 5000 --test 2000
  python -m ferry.bench.datasets mnist --idx-dir ../shared/data/MNIST/raw --out data/digits --train 600 --test 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
DEFAULT_IDX = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "data/MNIST/raw"}


def _take(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced sample: n // classes images of each class (all images when n is 0)."""
    if not n:
        return x, y
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = n // len(classes)
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), size=min(per_class, int((y == c).sum())), replace=False)
                           for c in classes])
    keep = np.sort(keep)
    return x[keep], y[keep]


def write_class_folders(dataset: str, idx_dir: str | Path, out: str | Path, *, train: int, test: int, seed: int = 0,
                        rgb: bool = True) -> dict[str, int]:
    """Write `train` training and `test` test images as PNG class folders; return the counts."""
    from PIL import Image

    from ferry.core.idx import read_mnist

    classes = FASHION_CLASSES if dataset == "fashion-mnist" else DIGIT_CLASSES
    out = Path(out)
    counts = {}
    for split, n, part in (("train", train, "train"), ("t10k", test, "val")):
        x, y = _take(*read_mnist(None, split, raw=idx_dir), n, seed)
        for i, (img, label) in enumerate(zip(x, y)):
            folder = out / part / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(img)
            (im.convert("RGB") if rgb else im).save(folder / f"{split}-{i:05d}.png")
        counts[part] = len(y)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DEFAULT_IDX))
    parser.add_argument("--idx-dir", help="folder of the IDX files (.gz or not); default: "
                        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_IDX.items()))
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=5000, help="training images, the same number of each class (0: all)")
    parser.add_argument("--test", type=int, default=2000, help="held-out images from the test set, the same number of each class (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ferry.core.errors import FerryError

    try:
        counts = write_class_folders(args.dataset, args.idx_dir or DEFAULT_IDX[args.dataset], args.out,
                                     train=args.train, test=args.test, seed=args.seed)
    except FerryError as exc:
        print(f"datasets: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['val']} held-out images to {args.out}/train and {args.out}/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
