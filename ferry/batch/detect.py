"""Detectors in `ferry batch`: one Parquet row per input with its detections. The batch actor
(job.PredictPart) hands detectors here; the job's own checks (every input exactly once) read the
path and error columns, which both schemas share.

A row: path, detections (a list of {label, category_id, index, score, box: [x1, y1, x2, y2]} in the
image's pixels, best first), count, width, height, provider, error. A file that cannot be read or
decoded is a row with its error and no detections."""

from __future__ import annotations

from typing import Any


def detection_schema():
    import pyarrow as pa

    det = pa.struct([("label", pa.string()), ("category_id", pa.int64()), ("index", pa.int64()), ("score", pa.float64()),
                     ("box", pa.list_(pa.float64()))])
    return pa.schema([("path", pa.string()), ("detections", pa.list_(det)), ("count", pa.int64()), ("width", pa.int64()),
                      ("height", pa.int64()), ("provider", pa.string()), ("error", pa.string())])


def detection_rows(det: Any, paths: list[str], blobs: list[bytes], read_errors: list[str], *,
                   min_score: float | None = None) -> dict[str, list]:
    """Result columns for a batch of (path, bytes, read error) through `det.detect_many`: the
    readable files are detected in one batch; the others keep their read error."""
    readable = [i for i, e in enumerate(read_errors) if not e]
    outcomes = dict(zip(readable, det.detect_many([blobs[i] for i in readable], names=[paths[i] for i in readable],
                                                  batch_size=max(1, len(readable)), min_score=min_score)))
    out: dict[str, list] = {k: [] for k in ("path", "detections", "count", "width", "height", "provider", "error")}
    for i, path in enumerate(paths):
        o = outcomes.get(i)
        found = o.result if o else None
        out["path"].append(path)
        out["detections"].append([d.to_dict() for d in found.detections] if found else [])
        out["count"].append(len(found.detections) if found else None)
        out["width"].append(found.width if found else None)
        out["height"].append(found.height if found else None)
        out["provider"].append(det.provider.used)
        out["error"].append(o.error if o else read_errors[i])
    return out
