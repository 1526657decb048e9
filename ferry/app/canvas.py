"""The drawing canvas without a display: strokes -> image -> prediction.

`ferry draw` records the mouse as strokes (point lists with a pen width); `render_strokes`
turns them into the same white-canvas, black-ink image a scan of a handwritten digit would be,
and `predict_canvas` sends that image through the runtime's MNIST-style normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from ferry.runtime.classifier import Classifier, Prediction
from ferry.runtime.presets import EmptyImageError

CANVAS_SIZE = 280
PEN_WIDTH = 18


@dataclass
class Stroke:
    points: list[tuple[float, float]] = field(default_factory=list)
    width: float = PEN_WIDTH


def render_strokes(strokes: Sequence[Stroke], size: int = CANVAS_SIZE) -> Image.Image:
    """Black round-capped strokes on a white `size` x `size` grayscale canvas."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        r = stroke.width / 2
        pts = [(float(x), float(y)) for x, y in stroke.points]
        if len(pts) > 1:
            draw.line(pts, fill=0, width=max(1, round(stroke.width)), joint="curve")
        for x, y in pts:  # round caps and joints
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


def predict_canvas_image(clf: Classifier, image: Image.Image, top_k: int = 10) -> Prediction:
    """The app's path from a canvas image to a prediction (raises EmptyImageError for no digit)."""
    return clf.predict(image, top_k=top_k)


def predict_strokes(clf: Classifier, strokes: Sequence[Stroke], size: int = CANVAS_SIZE, top_k: int = 10) -> Prediction:
    """Render and predict; a blank canvas or a single dot raises EmptyImageError ("draw a digit")."""
    if ink_extent(strokes) < 0.1 * size:
        raise EmptyImageError("draw a digit")
    return predict_canvas_image(clf, render_strokes(strokes, size), top_k=top_k)
