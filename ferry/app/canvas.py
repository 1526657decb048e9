"""The drawing canvas without a display: strokes -> image -> prediction.

`ferry draw` records the mouse as strokes (point lists with a pen width); `render_strokes`
turns them into the same white-canvas, black-ink image a scan of a handwritten digit would be.
The model reads the strokes redrawn with an MNIST-like pen (`normalize_pen`: the pen's width in
proportion to the drawing's size), so a thin or thick pen reads alike; `predict_strokes` sends
that image through the runtime's MNIST-style normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from ferry.runtime.classifier import Classifier, Prediction
from ferry.runtime.presets import EmptyImageError

CANVAS_SIZE = 280
PEN_WIDTH = 18  # the pen the window starts with
PEN_RANGE = (6, 36)  # what its pen slider offers
# MNIST's pen: about 0.14 of the digit's larger side (2.8 px of its 20 px box). The model reads the
# strokes redrawn with that pen, whatever pen the person chose (docs: "Draw").
STROKE_RATIO = 0.14


@dataclass
class Stroke:
    points: list[tuple[float, float]] = field(default_factory=list)
    width: float = PEN_WIDTH


def render_strokes(strokes: Sequence[Stroke], size: int = CANVAS_SIZE) -> Image.Image:
    """Black round-capped strokes on a white `size` x `size` grayscale canvas."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    dots: set[tuple[float, float, float]] = set()
    for stroke in strokes:
        pts = [(float(x), float(y)) for x, y in stroke.points]
        if len(pts) > 1:
            draw.line(pts, fill=0, width=max(1, round(stroke.width)), joint="curve")
        dots.update((x, y, stroke.width / 2) for x, y in pts)
    for x, y, r in dots:  # round caps and joints, each point once
        draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return img


def ink_extent(strokes: Sequence[Stroke]) -> float:
    """The larger side of the strokes' bounding box, pen width included (0 for no strokes)."""
    pts = [(x, y) for s in strokes for x, y in s.points]
    if not pts:
        return 0.0
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    width = max(s.width for s in strokes if s.points)
    return max(max(xs) - min(xs), max(ys) - min(ys)) + width


def centre_extent(strokes: Sequence[Stroke]) -> float:
    """The larger side of the bounding box of the strokes' centre lines (pen width excluded)."""
    pts = [(x, y) for s in strokes for x, y in s.points]
    if not pts:
        return 0.0
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return max(max(xs) - min(xs), max(ys) - min(ys))


def normalize_pen(strokes: Sequence[Stroke], ratio: float = STROKE_RATIO) -> list[Stroke]:
    """The same strokes, drawn with a pen `ratio` times the drawing's size: a thin pen on a large
    digit and a thick pen on a small one both become MNIST's pen."""
    width = max(1.0, ratio * centre_extent(strokes))
    return [Stroke(list(s.points), width=width) for s in strokes]


def strokes_to_image(strokes: Sequence[Stroke], size: int = CANVAS_SIZE) -> Image.Image:
    """What the model reads of a drawing: its strokes with the normalized pen, as a canvas image."""
    return render_strokes(normalize_pen(strokes), size)


def predict_canvas_image(clf: Classifier, image: Image.Image, top_k: int = 10) -> Prediction:
    """The app's path from a canvas image to a prediction (raises EmptyImageError for no digit)."""
    return clf.predict(image, top_k=top_k)


def predict_strokes(clf: Classifier, strokes: Sequence[Stroke], size: int = CANVAS_SIZE, top_k: int = 10) -> Prediction:
    """The app's path from strokes to a prediction: `strokes_to_image`, then the runtime's MNIST-style
    normalization. A blank canvas or a single dot raises EmptyImageError ("draw a digit")."""
    if ink_extent(strokes) < 0.1 * size:
        raise EmptyImageError("draw a digit")
    return predict_canvas_image(clf, strokes_to_image(strokes, size), top_k=top_k)
