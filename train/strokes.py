"""Digits as a pen writes them: an MNIST digit's centre line (its skeleton) as line segments, and
those segments drawn again with a round pen. The canvas benchmarks write test digits this way, and
the digit scenes draw a share of their training digits this way, so a detector trained on scenes
has seen pen strokes as well as scanned bitmaps (docs: "Detection").
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))  # each 8-connected pair of skeleton pixels once


def skeleton_segments(digit: np.ndarray, upscale: int = 4) -> np.ndarray:
    """The digit's centre line as (M, 2, 2) segments [[y0, x0], [y1, x1]] in 28x28 pixel units."""
    from skimage.morphology import skeletonize

    big = np.asarray(Image.fromarray(digit).resize((28 * upscale,) * 2, Image.Resampling.BICUBIC), dtype=np.float32)
    skel = skeletonize(big > 0.4 * 255)
    ys, xs = np.nonzero(skel)
    on = set(zip(ys.tolist(), xs.tolist()))
    segs = []
    for y, x in sorted(on):  # sorted: the same digit gives the same segments in the same order
        linked = False
        for dy, dx in _NEIGHBOURS:
            if (y + dy, x + dx) in on:
                segs.append(((y, x), (y + dy, x + dx)))
                linked = True
        if not linked and not any((y - dy, x - dx) in on for dy, dx in _NEIGHBOURS):
            segs.append(((y, x), (y, x)))  # an isolated dot
    if not segs:
        return np.zeros((0, 2, 2), np.float32)
    return (np.asarray(segs, dtype=np.float32) + 0.5) / upscale


def pen_mask(segments: np.ndarray, *, height: float, pen: float, stretch: float = 1.0, shear: float = 0.0,
             supersample: int = 1) -> np.ndarray:
    """Segments (M, 2, 2) [[y, x], ...] drawn with a round pen of width `pen` px as an ink mask
    (float32 in [0, 1]) whose ink is `height` px tall (pen included): the centre line is scaled to
    `height - pen`, stretched in width by `stretch` and slanted by `shear` (the top leans right for a
    positive shear, the bottom stays). `supersample` > 1 draws at that many times the size and
    averages down (soft edges, as a scan); 1 gives the canvas's hard edges."""
    if not len(segments):
        return np.zeros((1, 1), np.float32)
    pts = segments.reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    pen = max(1.0, float(pen))
    core = max(1.0, float(height) - pen)
    scale = core / max(float(hi[0] - lo[0]), float(hi[1] - lo[1]) / 3, 1e-6)
    ys = (segments[..., 0] - lo[0]) * scale
    xs = (segments[..., 1] - lo[1]) * scale * stretch + shear * (core - ys)
    xs = xs - xs.min() + pen / 2 + 1
    ys = ys + pen / 2 + 1
    w, h = int(math.ceil(xs.max() + pen / 2)) + 2, int(math.ceil(ys.max() + pen / 2)) + 2
    s = max(1, int(supersample))
    img = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(img)
    width, r = max(1, round(pen * s)), pen * s / 2
    for (y0, y1), (x0, x1) in zip(ys * s, xs * s):
        draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=255, width=width)
    for y, x in {(float(y), float(x)) for y, x in zip((ys * s).ravel(), (xs * s).ravel())}:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    if s > 1:
        img = img.resize((w, h), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0
