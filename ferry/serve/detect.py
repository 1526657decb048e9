"""Detectors over HTTP: what `POST /v1/models/<name>/predict` answers for a detector (the handler in
app.py hands detectors here). The image goes through the runtime's letterbox, the backend's batcher
runs the graph (one packed row per image: `Detector.infer`), and the row becomes the image's
detections in its own pixels.

A detection response is {"model", "detections": [{"label", "category_id", "index", "score",
"box": [x1, y1, x2, y2]}, ...], "width", "height", "min_score", "provider", "latency_ms"};
`?min_score=S` (0-1, default 0.5) sets what is returned. Bad input: a 4xx with one line, as for
classifiers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ferry.core.errors import FerryError


def parse_min_score(raw: str | None) -> float | None:
    """`?min_score=` -> a float in [0, 1] (None: the runtime's default); a FerryError otherwise."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:  # also refuses NaN
        raise FerryError(f"min_score must be a number from 0 to 1 (got {raw!r})")
    return value


async def predict_detections(request: Any, name: str, det: Any, backend: Any, read_image, error, t0: float):
    """The response to a predict request for the detector `det` (served as `name`). `read_image` and
    `error` are the app's own (the body limit, multipart, one-line errors)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from ferry.runtime.images import ImageError

    try:
        min_score = parse_min_score(request.query_params.get("min_score"))
    except FerryError as exc:
        return error(400, str(exc))
    data = await read_image(request)
    if isinstance(data, JSONResponse):
        return data
    if not data:
        return error(400, "empty body: send an image (raw bytes, or a multipart file field)")
    try:
        x, frame = await run_in_threadpool(det.prepare_frame, data, "image")
    except ImageError as exc:
        message = str(exc)
        return error(413 if "too large" in message else 400, message)
    except FerryError as exc:
        return error(400, str(exc))
    row = await backend.infer(name, x)
    found = det.detections(np.asarray(row), frame, min_score)
    return JSONResponse({"model": name, **found.to_dict(), "latency_ms": round(1e3 * (time.perf_counter() - t0), 3)})
