"""Digit scenes: a detection data set everyone can make offline from MNIST, written as COCO.

Each scene is a canvas of 128-256 px a side (width and height drawn separately) with a background
shade and gradient, clutter (long thin lines, frames, specks), some digits and pixel noise. A digit
is an MNIST digit cropped to its ink, scaled so its ink is 14-56 px tall, slanted (a shear of up to
25 degrees) and stretched a little in width, with its own ink strength; digits never overlap. Ink
is dark on a light page in most scenes and light on a dark one in the others, tinted. A share of the
digits (`pen_share`) is written as a pen writes: the digit's centre line redrawn with a round pen
(`ferry.train.strokes`), so that what people write on `ferry draw --detector`'s canvas is not new to a
detector trained on scenes. In training scenes, half the placements (`rows`) are a written number: 2-5
digits of about one height in a row, with small gaps and a wandering baseline. Validation and test
scenes have single digits only (`TEST_CONFIG_CHANGES`): they stay the benchmark the detection
targets are set on, while numbers are read in their own benchmark (`ferry.bench.canvas_numbers`).

A digit's box is the tight box of its ink (pixels above a quarter of the ink's strength), in pixel
edges: [x, y, width, height] in COCO's `bbox`. Categories are the ten digits, named "0" to "9",
with COCO ids 1 to 10.

Train scenes use MNIST's training digits except a fixed held-out share, which makes the validation
scenes; test scenes use MNIST's test digits only. So no digit image is in two splits.

  python -m ferry.train.scenes --mnist-dir data --out data/digit-scenes --train 10000 --val 500 --test 1000

writes OUT/{train,val,test}/*.png and OUT/{train,val,test}.json (numpy, pillow and scikit-image).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path, write_json_atomic

CATEGORIES = tuple({"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10))
VAL_DIGITS = 5000  # MNIST training digits held out for the validation scenes: the digit CNN's validation digits
HELD_OUT = "the digit CNN's validation digits (ferry.train.data.split_indices)"  # recorded in each scene JSON's info
INK_THRESHOLD = 0.25  # a pixel belongs to a digit's box above this share of its ink strength


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look. The defaults are the demo's (docs: "Detection")."""

    min_side: int = 128  # canvas width and height, each drawn from [min_side, max_side]
    max_side: int = 256
    min_digit: int = 14  # a digit's ink height in pixels, drawn from [min_digit, max_digit]
    max_digit: int = 56
    max_digits: int = 6  # placements per scene (a digit, or a row of digits): 1 to max_digits (fewer when they do not fit)
    slant_degrees: float = 25.0  # shear of up to this angle, either way
    clutter: int = 5  # clutter items per scene: 0 to clutter
    noise: float = 0.05  # pixel noise: standard deviation up to this (in units of the full range)
    dark_on_light: float = 0.7  # share of scenes with dark ink on a light page
    pen_share: float = 0.4  # share of digits written as pen strokes (their skeleton, redrawn) instead of scanned
    rows: float = 0.5  # share of a scene's placements that are a written number: a row of 2-5 digits

    def check(self) -> None:
        problems = []
        if not 16 <= self.min_side <= self.max_side:
            problems.append(f"sides must satisfy 16 <= min_side <= max_side (got {self.min_side}, {self.max_side})")
        if not 4 <= self.min_digit <= self.max_digit or self.max_digit > self.min_side - 4:
            problems.append(f"digit sizes must satisfy 4 <= min_digit <= max_digit <= min_side - 4 (got {self.min_digit}, "
                            f"{self.max_digit})")
        if (self.max_digits < 1 or self.clutter < 0 or not 0 <= self.noise <= 0.5 or not 0 <= self.dark_on_light <= 1
                or not 0 <= self.pen_share <= 1 or not 0 <= self.rows <= 1):
            problems.append("max_digits >= 1, clutter >= 0, noise in [0, 0.5], dark_on_light, pen_share and rows in [0, 1]")
        if problems:
            raise FerryError("scene config: " + "; ".join(problems))


TEST_CONFIG_CHANGES = {"rows": 0.0}  # validation and test scenes: single digits only


@dataclass(frozen=True)
class Placed:
    """A digit in a scene: its box in pixel edges (x1, y1, x2, y2) and its digit."""

    box: tuple[float, float, float, float]
    digit: int


# --- one digit ----------------------------------------------------------------------------------


def _crop_to_ink(digit: np.ndarray) -> np.ndarray:
    """The digit cropped to its ink: the pixels above INK_THRESHOLD of its brightest, as the box is measured."""
    on = digit > INK_THRESHOLD * max(1, int(digit.max()))
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if not rows.size:
        return digit
    return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _crop_to_mask_ink(mask: np.ndarray) -> np.ndarray:
    """An ink mask cropped to its ink (above INK_THRESHOLD) with a 1 px margin; (1, 1) of zeros for none."""
    rows, cols = np.flatnonzero(mask.max(1) > INK_THRESHOLD), np.flatnonzero(mask.max(0) > INK_THRESHOLD)
    if not rows.size:
        return np.zeros((1, 1), np.float32)
    return mask[max(0, rows[0] - 1):rows[-1] + 2, max(0, cols[0] - 1):cols[-1] + 2]


def digit_sprite(digit: np.ndarray, rng: np.random.Generator, cfg: SceneConfig, height: float | None = None) -> np.ndarray:
    """An MNIST digit (28x28 uint8, light on dark) as an ink mask (float32 in [0, 1]) cropped to its
    ink: scaled to `height` px of ink (default: drawn from the config), stretched in width by
    0.8-1.2 and slanted by up to `slant_degrees`."""
    crop = _crop_to_ink(digit).astype(np.float32) / 255.0
    h, w = crop.shape
    height = float(height if height is not None else rng.uniform(cfg.min_digit, cfg.max_digit))
    scale = height / h
    stretch = float(rng.uniform(0.8, 1.2))
    new_w, new_h = max(1, round(w * scale * stretch)), max(1, round(h * scale))
    img = Image.fromarray(crop, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR)
    shear = math.tan(math.radians(float(rng.uniform(-cfg.slant_degrees, cfg.slant_degrees))))
    extra = abs(shear) * new_h
    out_w = int(math.ceil(new_w + extra)) + 2
    # a row y_in of the input moves right by shear * (new_h - y_in): the bottom stays, the top leans
    # (plus a 1 px margin, and `extra` when it leans left); PIL maps each output pixel to its input
    shift = -1.0 - (extra if shear < 0 else 0.0) - shear * (new_h + 1)
    img = img.transform((out_w, new_h + 2), Image.Transform.AFFINE, (1.0, shear, shift, 0.0, 1.0, -1.0),
                        Image.Resampling.BILINEAR)
    mask = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return _crop_to_mask_ink(mask)


def pen_sprite(digit: np.ndarray, rng: np.random.Generator, cfg: SceneConfig, height: float | None = None) -> np.ndarray:
    """An MNIST digit as a pen writes it (`ferry.train.strokes`): its centre line redrawn with a round
    pen 0.08-0.2 of its height wide (the canvas redraws a number with 0.14), `height` px of ink,
    stretched and slanted as `digit_sprite`; hard edges (a canvas) or soft ones (a scan), half each."""
    from ferry.train.strokes import pen_mask, skeleton_segments

    height = float(height if height is not None else rng.uniform(cfg.min_digit, cfg.max_digit))
    pen = float(rng.uniform(0.08, 0.2)) * height
    stretch = float(rng.uniform(0.8, 1.2))
    shear = math.tan(math.radians(float(rng.uniform(-cfg.slant_degrees, cfg.slant_degrees))))
    mask = pen_mask(skeleton_segments(digit), height=height, pen=pen, stretch=stretch, shear=shear,
                    supersample=int(rng.choice([1, 3])))
    return _crop_to_mask_ink(mask)


def ink_box(mask: np.ndarray, left: int, top: int) -> tuple[float, float, float, float] | None:
    """The tight box (pixel edges) of a sprite's ink placed at (left, top)."""
    on = mask > INK_THRESHOLD
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if not rows.size:
        return None
    return (float(left + cols[0]), float(top + rows[0]), float(left + cols[-1] + 1), float(top + rows[-1] + 1))


# --- one scene ----------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int, level: float) -> np.ndarray:
    """A page of brightness `level` with a gentle linear gradient and a low-frequency shade."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * xx / w + math.sin(angle) * yy / h) * float(rng.uniform(-0.12, 0.12))
    coarse = rng.standard_normal((4, 4)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)) * float(rng.uniform(0, 0.04))
    return level + ramp + shade


def _clutter(rng: np.random.Generator, h: int, w: int, n: int, long: float) -> np.ndarray:
    """An ink mask of clutter that cannot pass for a digit: thin lines and frames longer than any
    digit (`long` px at least), and specks smaller than a stroke."""
    img = Image.new("F", (w, h), 0.0)
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        kind = rng.choice(["line", "frame", "specks"], p=[0.45, 0.2, 0.35])
        strength = float(rng.uniform(0.3, 1.0))
        if kind == "line":
            length = float(rng.uniform(long, max(long, 1.5 * max(w, h))))
            angle = rng.uniform(0, math.pi)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=strength, width=int(rng.integers(1, 3)))
        elif kind == "frame":
            x0, y0 = rng.uniform(-20, w - 20), rng.uniform(-20, h - 20)
            x1, y1 = x0 + rng.uniform(long, max(long, w)), y0 + rng.uniform(long, max(long, h))
            draw.rectangle([x0, y0, x1, y1], outline=strength, width=1)
        else:
            for _ in range(int(rng.integers(3, 25))):
                x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 1.5)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=strength)
    return np.array(img, dtype=np.float32)  # a writable copy: digits are drawn into it


def _overlaps(box: tuple[float, ...], others: list[tuple[float, ...]], margin: float = 2.0) -> bool:
    return any(box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin
               for o in others)


def _place_row(rng: np.random.Generator, ink: np.ndarray, digits: np.ndarray, labels: np.ndarray, cfg: SceneConfig,
               taken: list[tuple[float, ...]]) -> list[Placed]:
    """A written number drawn into `ink`: 2-5 digits of one height (each 0.85-1.1 of it, within the
    config's sizes) and one ink strength, left to right with gaps of 0.1-0.5 of the height and a
    wandering baseline (up to a tenth of the height), each scanned or pen-written. Digits that do not
    fit are dropped from the right; [] when fewer than two fit or no free place is found."""
    h, w = ink.shape
    height = float(rng.uniform(cfg.min_digit, cfg.max_digit))
    strength = float(rng.uniform(0.75, 1.0))
    picks = rng.integers(0, len(digits), size=int(rng.integers(2, 6)))
    sizes = [min(max(height * float(rng.uniform(0.85, 1.1)), cfg.min_digit), cfg.max_digit) for _ in picks]
    sprites = [(pen_sprite if rng.random() < cfg.pen_share else digit_sprite)(digits[i], rng, cfg, height=size) * strength
               for i, size in zip(picks, sizes)]
    gaps = [max(2.0, float(rng.uniform(0.1, 0.5)) * height) for _ in sprites]
    wander = [float(rng.uniform(-0.1, 0.1)) * height for _ in sprites]
    bottom = max(s.shape[0] for s in sprites)
    lefts = np.cumsum([0.0] + [s.shape[1] + g for s, g in zip(sprites[:-1], gaps)]).round().astype(int)
    tops = [int(round(bottom - s.shape[0] + dy)) for s, dy in zip(sprites, wander)]
    tops = [t - min(tops) for t in tops]
    while len(sprites) >= 2 and lefts[len(sprites) - 1] + sprites[-1].shape[1] >= w:
        sprites.pop()
    n = len(sprites)
    row_h = max(t + s.shape[0] for t, s in zip(tops[:n], sprites))
    if n < 2 or row_h >= h:
        return []
    row_w = int(lefts[n - 1]) + sprites[-1].shape[1]
    for _try in range(30):
        top, left = int(rng.integers(0, h - row_h + 1)), int(rng.integers(0, w - row_w + 1))
        boxes = [ink_box(s, left + int(lefts[k]), top + tops[k]) for k, s in enumerate(sprites)]
        if all(b is not None and not _overlaps(b, taken) for b in boxes):
            for k, s in enumerate(sprites):
                region = ink[top + tops[k]:top + tops[k] + s.shape[0], left + lefts[k]:left + lefts[k] + s.shape[1]]
                np.maximum(region, s, out=region)
            return [Placed(b, int(labels[i])) for b, i in zip(boxes, picks)]  # type: ignore[arg-type]
    return []


def render_scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray,
                 cfg: SceneConfig = SceneConfig()) -> tuple[Image.Image, list[Placed]]:
    """One scene (an RGB image) and its digits, drawn from `digits` (N, 28, 28) uint8 and their labels."""
    w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
    dark = bool(rng.random() < cfg.dark_on_light)
    page = float(rng.uniform(0.75, 1.0) if dark else rng.uniform(0.0, 0.25))
    ink_level = float(rng.uniform(0.0, page - 0.45) if dark else rng.uniform(page + 0.45, 1.0))
    ink = _clutter(rng, h, w, int(rng.integers(0, cfg.clutter + 1)), long=1.25 * cfg.max_digit)
    placed: list[Placed] = []
    for _ in range(int(rng.integers(1, cfg.max_digits + 1))):
        if cfg.rows and rng.random() < cfg.rows:  # (no draw at all without rows: such scenes stay as they were)
            placed += _place_row(rng, ink, digits, labels, cfg, [p.box for p in placed])
            continue
        i = int(rng.integers(0, len(digits)))
        draw = pen_sprite if rng.random() < cfg.pen_share else digit_sprite
        sprite = draw(digits[i], rng, cfg) * float(rng.uniform(0.75, 1.0))
        sh, sw = sprite.shape
        if sh >= h or sw >= w:
            continue
        for _try in range(30):
            top, left = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
            box = ink_box(sprite, left, top)
            if box is not None and not _overlaps(box, [p.box for p in placed]):
                region = ink[top:top + sh, left:left + sw]
                np.maximum(region, sprite, out=region)
                placed.append(Placed(box, int(labels[i])))
                break
    if not placed:  # every digit failed to fit (tiny canvases): place one small digit in a corner
        i = int(rng.integers(0, len(digits)))
        sprite = digit_sprite(digits[i], rng, cfg, height=cfg.min_digit)
        sh, sw = sprite.shape
        region = ink[:sh, :sw]
        np.maximum(region, sprite[:h, :w], out=region)
        placed.append(Placed(ink_box(sprite, 0, 0), int(labels[i])))
    gray = _background(rng, h, w, page)
    gray = gray * (1.0 - ink) + ink_level * ink
    gray += rng.standard_normal((h, w)).astype(np.float32) * float(rng.uniform(0, cfg.noise))
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    rgb = np.clip(gray[..., None] * tint, 0.0, 1.0)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB"), placed


# --- COCO ---------------------------------------------------------------------------------------


def digit_pools(mnist_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's digits for each split: train (training digits minus the held-out ones), val (the
    VAL_DIGITS held-out training digits: the ones `ferry train` holds out for the digit CNN, so that
    the numbers written from them for comparing readers, which both models read, are held out from
    both), test (the test digits)."""
    from ferry.core.idx import read_mnist
    from ferry.train.data import split_indices

    train_x, train_y = read_mnist(mnist_dir, "train")
    test_x, test_y = read_mnist(mnist_dir, "t10k")
    n_val = min(VAL_DIGITS, max(1, len(train_x) // 12))  # a small MNIST-format set (tests) keeps most for training
    val_idx, train_idx = split_indices(len(train_x), n_val)
    held, kept = np.sort(val_idx.numpy()), np.sort(train_idx.numpy())
    return {"train": (train_x[kept], train_y[kept]), "val": (train_x[held], train_y[held]), "test": (test_x, test_y)}


def split_config(split: str) -> SceneConfig:
    """The demo's scenes for a split: rows of digits in training scenes only (`TEST_CONFIG_CHANGES`)."""
    return SceneConfig() if split == "train" else replace(SceneConfig(), **TEST_CONFIG_CHANGES)


def write_split(out: str | Path, split: str, digits: np.ndarray, labels: np.ndarray, n: int, *, seed: int,
                cfg: SceneConfig | None = None, progress: Callable[[int], None] | None = None) -> Path:
    """Write `n` scenes as OUT/<split>/NNNNNN.png and their COCO instances as OUT/<split>.json
    (written last, atomically: a JSON names only images that are there). Returns the JSON's path.
    `cfg`: how the scenes look (default: the demo's for this split, `split_config`)."""
    cfg = cfg or split_config(split)
    cfg.check()
    if n < 1:
        raise FerryError(f"a split needs at least one scene (got {n} for {split})")
    out = Path(out)
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    # each split draws from its own stream: the test scenes do not change with the number of train scenes
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}.get(split, 3)])
    images, annotations = [], []
    for k in range(n):
        img, placed = render_scene(rng, digits, labels, cfg)
        name = f"{k:06d}.png"
        with atomic_path(folder / name) as tmp:
            img.save(tmp, format="PNG")
        images.append({"id": k + 1, "file_name": name, "width": img.width, "height": img.height})
        for p in placed:
            x1, y1, x2, y2 = p.box
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": p.digit + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        if progress:
            progress(k + 1)
    doc = {"info": {"description": f"ferry digit scenes, {split} split", "generator": "ferry.train.scenes",
                    "seed": seed, "config": asdict(cfg), "held_out_digits": HELD_OUT},
           "images": images, "annotations": annotations, "categories": list(CATEGORIES)}
    target = out / f"{split}.json"
    write_json_atomic(target, doc)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferry.train.scenes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", default="data", help="folder holding MNIST/raw/*-ubyte (default: data)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=10000, help="train scenes (default: 10000)")
    parser.add_argument("--val", type=int, default=500, help="validation scenes (default: 500)")
    parser.add_argument("--test", type=int, default=1000, help="test scenes (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        pools = digit_pools(args.mnist_dir)
        for split in ("train", "val", "test"):
            n = getattr(args, split)
            if n:
                path = write_split(args.out, split, *pools[split], n, seed=args.seed)
                doc: dict[str, Any] = json.loads(path.read_text())
                print(f"{split}: {len(doc['images'])} scenes, {len(doc['annotations'])} digits -> {path}")
    except FerryError as exc:
        print(f"scenes: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
