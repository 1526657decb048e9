"""Detectors over HTTP: what `POST /v1/models/<name>/predict` answers for a detector. The app
(app.py) admits the request as for a classifier; the image goes through the runtime's letterbox,
the backend's batcher runs the graph (one packed row per image: `Detector.infer`), and the row
becomes the image's detections in its own pixels (`Detector.detections`).

A detection answer is {"model", "detections": [{"label", "category_id", "index", "score",
"box": [x1, y1, x2, y2]}, ...], "width", "height", "min_score", "provider", "latency_ms",
"request_id"}; `?min_score=S` (0 to 1; default: the runtime's 0.5) sets what is returned."""

from __future__ import annotations

import re

from ferry.core.errors import FerryError

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # plain decimals: no sign, exponent, spaces or underscores


def parse_min_score(values: list[str]) -> float | None:
    """The `min_score` query parameter: a number in [0, 1], given at most once (None: the runtime's
    default); a FerryError otherwise."""
    if not values:
        return None
    raw = values[-1]
    value = float(raw) if len(values) == 1 and _DECIMAL.fullmatch(raw) else float("nan")
    if not 0 <= value <= 1:  # also refuses NaN
        shown = raw if len(raw) <= 20 else raw[:20] + "..."
        raise FerryError(f"query parameter min_score must be a number from 0 to 1, given once (got {shown!r})")
    return value
