"""The drawing canvas without a display: strokes -> image -> prediction.

`ferry draw` records the mouse as strokes (point lists with a pen width); `render_strokes`
turns them into the same white-canvas, black-ink image a scan of a handwritten digit would be.
The model reads the strokes redrawn with an MNIST-like pen (`normalize_pen`: the pen's width in
proportion to the drawing's size), so a thin or thick pen reads alike; `predict_strokes` sends
that image through the runtime's MNIST-style normalization.

A detector reads a whole number (`read_number`): several digits written in a row, redrawn with an
MNIST-like pen and scaled to the digit size the detector was trained on (`number_image`), then
one detection per place, left to right. With a digit model the detector finds the places and the
model names each from its own strokes; the ink checks the places (`places_from_ink`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from ferry.runtime.classifier import Classifier, Prediction
from ferry.runtime.detector import Detection
from ferry.runtime.images import MIN_SIDE
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


# --- a whole number, read by a detector --------------------------------------------------------------

NUMBER_CANVAS = (640, 240)  # the number window's canvas: width, height
NUMBER_INK_HEIGHT = 40.0  # px: the drawing is scaled so its ink is this tall (the middle of the scenes' 14-56 px digits)
NUMBER_MARGIN = 12  # px of page around the scaled drawing


@dataclass(frozen=True)
class NumberReading:
    """What was read: the digits left to right, each detection with its box on the canvas; with a digit
    model naming the places, `by_detector` is what the detector alone read: its own places (before the
    ink checked them) and labels."""

    text: str
    detections: tuple  # ferry.runtime.detector.Detection, boxes in canvas coordinates, left to right
    image: Image.Image  # what the detector was given
    by_detector: str = ""  # the detector's own places and labels (the text when it named them)


def number_image(strokes: Sequence[Stroke], ink_height: float = NUMBER_INK_HEIGHT,
                 margin: int = NUMBER_MARGIN) -> tuple[Image.Image, float, float, float]:
    """What a detector reads of a drawing of several digits: the strokes redrawn with an MNIST-like
    pen (`STROKE_RATIO` of the drawing's height, its digits' height when they stand in a row), scaled
    so the ink is `ink_height` px tall, on a white page `margin` px larger all round. Returns (image,
    scale, left, top): canvas point (x, y) is image point ((x - left) * scale, (y - top) * scale)."""
    pts = [(x, y) for s in strokes for x, y in s.points]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    # a flat drawing (a dash, a dot) counts as a tenth of its width tall: never scaled into a giant image
    height = max(max(ys) - min(ys), (max(xs) - min(xs)) / 10)
    pen = max(1.0, STROKE_RATIO * height)
    scale = ink_height / max(height + pen, 1.0)
    left, top = min(xs) - pen / 2 - margin / scale, min(ys) - pen / 2 - margin / scale
    width = round((max(xs) - min(xs) + pen) * scale + 2 * margin)
    size = (max(width, 16), round(ink_height + 2 * margin))
    moved = [Stroke([((x - left) * scale, (y - top) * scale) for x, y in s.points], width=pen * scale) for s in strokes]
    img = Image.new("L", size, 255)
    return _render_onto(img, moved), scale, left, top


def _render_onto(img: Image.Image, strokes: Sequence[Stroke]) -> Image.Image:
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        pts = [(float(x), float(y)) for x, y in stroke.points]
        if len(pts) > 1:
            draw.line(pts, fill=0, width=max(1, round(stroke.width)), joint="curve")
        r = stroke.width / 2
        for x, y in pts:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return img


def one_per_place(found, overlap: float = 0.5) -> list:
    """The detections of a row of digits, one per place: where boxes of different digits overlap
    (by more than `overlap` of the narrower one's width), the best scoring stays. Left to right."""
    kept: list = []
    for d in sorted(found, key=lambda d: -d.score):
        x1, _, x2, _ = d.box
        if all(min(x2, k.box[2]) - max(x1, k.box[0]) <= overlap * min(x2 - x1, k.box[2] - k.box[0]) for k in kept):
            kept.append(d)
    return sorted(kept, key=lambda d: d.box[0] + d.box[2])


READ_SCORE = 0.3  # a place counts as a digit from this detection score (chosen on numbers of held-out training digits)


def assign_strokes(strokes: Sequence[Stroke], boxes: Sequence[tuple[float, float, float, float]]) -> list[list[Stroke]]:
    """Each box's strokes (canvas coordinates, boxes left to right), in one pass: each stroke goes to
    the box holding most of its points, each box widened by a tenth of its height all round (ties:
    the box nearest the stroke's centre, then the leftmost). A stroke in no box (a mark under the
    number, a digit the detector missed) belongs to none."""

    def grown(b: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        m = 0.1 * (b[3] - b[1])
        return b[0] - m, b[1] - m, b[2] + m, b[3] + m

    wide = [grown(b) for b in boxes]

    def home(stroke: Stroke) -> int | None:
        inside = [sum(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in stroke.points) for b in wide]
        best = max(inside, default=0)
        if best == 0:
            return None
        cx = sum(x for x, _ in stroke.points) / len(stroke.points)
        cy = sum(y for _, y in stroke.points) / len(stroke.points)
        return min((((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2, j)
                   for j, b in enumerate(boxes) if inside[j] == best)[1]

    owned: list[list[Stroke]] = [[] for _ in boxes]
    for stroke in strokes:
        if stroke.points and (k := home(stroke)) is not None:
            owned[k].append(stroke)
    return owned


def ink_pieces(strokes: Sequence[Stroke], reach: float) -> list[list[int]]:
    """The separate pieces of ink of a drawing: strokes whose centre lines come within `reach` of
    each other (the pen's width: their inks touch) are one piece, and so on transitively. Each piece
    is a list of stroke indices, in drawing order; the pieces in the order of their first stroke."""
    reach = max(float(reach), 1e-6)
    parent = list(range(len(strokes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grid: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
    for i, stroke in enumerate(strokes):
        pts = stroke.points
        if not pts:
            continue
        dense = [pts[0]]  # points at most reach/2 apart along the stroke, so no crossing slips between them
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(math.hypot(x1 - x0, y1 - y0) / (reach / 2)) + 1
            dense += [(x0 + (x1 - x0) * t / n, y0 + (y1 - y0) * t / n) for t in range(1, n + 1)]
        for x, y in dense:
            cx, cy = int(x // reach), int(y // reach)
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for j, u, v in grid.get((cx + dx, cy + dy), ()):
                        if j != i and (u - x) ** 2 + (v - y) ** 2 <= reach * reach and root(i) != root(j):
                            parent[root(i)] = root(j)
            grid.setdefault((cx, cy), []).append((i, x, y))
    pieces: dict[int, list[int]] = {}
    for i, stroke in enumerate(strokes):
        if stroke.points:
            pieces.setdefault(root(i), []).append(i)
    return sorted(pieces.values(), key=lambda p: p[0])


def _bounds(strokes: Sequence[Stroke]) -> tuple[float, float, float, float]:
    xs = [x for s in strokes for x, _ in s.points]
    ys = [y for s in strokes for _, y in s.points]
    return min(xs), min(ys), max(xs), max(ys)


PIECE_HEIGHT = 0.5  # a piece of ink at least this share of a digit's height (the places' median) can be a digit


def places_from_ink(strokes: Sequence[Stroke], boxes: Sequence[tuple[float, float, float, float]],
                    owned: Sequence[Sequence[Stroke]] | None = None) -> list[tuple[float, float, float, float] | int]:
    """The detector's places (boxes, left to right), checked against the ink: a place holding two or
    more separate pieces of ink (`ink_pieces`), each at least half a digit tall and side by side
    (overlapping by at most 0.3 of the narrower's width), is that many places (a smaller piece there
    goes with the digit nearest it); a piece of ink in no
    place (`assign_strokes`) at least half a digit tall is a digit the detector missed. A digit's
    height is the places' median. Returns the places left to right: the index of a detector's box
    kept as it is, or a new box around a piece (pen included). Without boxes there is nothing to
    measure a digit by: none are added."""
    if not boxes:
        return []
    owned = assign_strokes(strokes, boxes) if owned is None else owned
    drawn = [s for s in strokes if s.points]
    reach = statistics.median(s.width for s in drawn) if drawn else 1.0
    tall = PIECE_HEIGHT * statistics.median(b[3] - b[1] for b in boxes)

    def around(piece: Sequence[Stroke]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = _bounds(piece)
        return x1 - reach / 2, y1 - reach / 2, x2 + reach / 2, y2 + reach / 2

    def digit_sized(piece: Sequence[Stroke]) -> bool:
        b = _bounds(piece)
        return b[3] - b[1] + reach >= tall

    places: list[tuple[float, float, float, float] | int] = []
    for k, own in enumerate(owned):
        pieces = [[own[i] for i in ix] for ix in ink_pieces(own, reach)]
        sized = [digit_sized(p) for p in pieces]
        found = sorted(((_bounds(p), p) for p, big in zip(pieces, sized) if big), key=lambda sd: sd[0][0])
        spans = [span for span, _ in found]
        if len(found) > 1 and all(min(a[2], b[2]) - max(a[0], b[0]) <= 0.3 * min(a[2] - a[0], b[2] - b[0])
                                  for a, b in zip(spans, spans[1:])):
            for small in (p for p, big in zip(pieces, sized) if not big):  # a mark goes with the digit nearest it
                x1, _, x2, _ = _bounds(small)
                min(found, key=lambda sd: max(sd[0][0] - x2, x1 - sd[0][2], 0.0))[1].extend(small)
            places += [around(p) for _, p in found]
        else:
            places.append(k)
    mine = {id(s) for own in owned for s in own}
    free = [s for s in strokes if s.points and id(s) not in mine]
    places += [around(p) for p in ([free[i] for i in ix] for ix in ink_pieces(free, reach)) if digit_sized(p)]

    def centre(p: tuple[float, float, float, float] | int) -> float:
        b = boxes[p] if isinstance(p, int) else p
        return b[0] + b[2]

    return sorted(places, key=centre)


def strokes_in(strokes: Sequence[Stroke], boxes: Sequence[tuple[float, float, float, float]], k: int) -> list[Stroke]:
    """The strokes of the digit boxed by `boxes[k]` (`assign_strokes`); none for a `k` that names no box."""
    return assign_strokes(strokes, boxes)[k] if 0 <= k < len(boxes) else []


def digit_image(strokes: Sequence[Stroke], ratio: float = STROKE_RATIO) -> Image.Image:
    """One digit's strokes as the single-digit canvas draws them (`strokes_to_image`), moved onto a
    square page of their own: what a digit model reads of a digit written in a number."""
    if not any(s.points for s in strokes):
        raise EmptyImageError("no strokes")
    extent = max(centre_extent(strokes), 1.0)
    pen = max(1.0, ratio * extent)
    side = round(1.5 * extent + pen) + 2
    if side < MIN_SIDE:  # a speck: its page would be under what the runtime reads at all
        raise EmptyImageError("a mark too small to read")
    x0, y0, x1, y1 = _bounds(strokes)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    moved = [Stroke([(x - cx + side / 2, y - cy + side / 2) for x, y in s.points], width=pen) for s in strokes]
    return render_strokes(moved, side)


def read_number(det, strokes: Sequence[Stroke], *, min_score: float = READ_SCORE, digits: Classifier | None = None
                ) -> NumberReading:
    """The app's path from strokes to a number: `number_image`, the detector, one digit per place,
    left to right; boxes mapped back onto the canvas. With `digits` (a digit classifier, such as
    mnist-cnn), the detector finds and boxes the digits and the classifier names each one from its own
    strokes (`assign_strokes`, `digit_image`): the label and score shown are the classifier's; the
    ink checks the places first (`places_from_ink`: a place holding two digits apart is two, a digit
    the detector missed is added, named by the classifier alone). `by_detector` is the detector's own
    reading. No ink: EmptyImageError ("write a number")."""
    import dataclasses

    if ink_extent(strokes) < 8:
        raise EmptyImageError("write a number")
    image, scale, left, top = number_image(strokes)
    found = det.detect(image, min_score=min_score)
    places = one_per_place(found.detections)
    on_canvas = [dataclasses.replace(d, box=(d.box[0] / scale + left, d.box[1] / scale + top,
                                             d.box[2] / scale + left, d.box[3] / scale + top)) for d in places]
    by_detector = "".join(d.label for d in on_canvas)
    if digits is not None:
        boxes = [d.box for d in on_canvas]
        owned = assign_strokes(strokes, boxes)  # one pass over the strokes for every place
        checked = places_from_ink(strokes, boxes, owned)
        if checked != list(range(len(boxes))):  # the ink split a place or found a digit the detector missed
            owned = assign_strokes(strokes, [boxes[p] if isinstance(p, int) else p for p in checked])
        named = []
        for p, own in zip(checked, owned):
            d = on_canvas[p] if isinstance(p, int) else None
            try:
                said = digits.predict(digit_image(own), top_k=1)
            except EmptyImageError:  # no stroke of its own, or only a dot: the detector's reading stays
                said = None
            if said is None or said.label not in det.labels:  # (a digit the detector does not know: its reading stays)
                if d is not None:  # (a place of the ink's own has no other reading: it goes)
                    named.append(d)
                continue
            i = det.labels.index(said.label)
            box = boxes[p] if isinstance(p, int) else p
            named.append(Detection(box, said.label, det.category_ids[i], i, said.probability))
        on_canvas = named
    return NumberReading("".join(d.label for d in on_canvas), tuple(on_canvas), image, by_detector)
