"""Detector: load an exported ferry detector once and find objects in files, PIL images or arrays.

    det = Detector.from_onnx("models/digits.onnx", provider="auto")
    found = det.detect("scene.png")         # -> Detections: boxes in the image's own pixels
    for d in found.detections: print(d.label, d.score, d.box)

The beside-`Classifier` of the runtime: the same provider handling (`open_engine`: read back, an
explicit provider that cannot run is an error), the same decoder, one bad input in a batch reported
and the rest still run. The post-processing (score threshold, NMS) is inside the model's graph; the
runtime letterboxes each image (`preprocess_letterbox`), runs the graph, and maps the boxes back
to the image's pixels. `min_score` (default `DEFAULT_MIN_SCORE`) is what people are shown; the
graph's own threshold is lower, for mAP.

`open_model(path)` returns a Detector or a Classifier, as the model's metadata says.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferry.core.errors import FerryError
from ferry.runtime import contract
from ferry.runtime.contract import ModelMetadata
from ferry.runtime.images import ImageError, check_image, decode_image, load_image
from ferry.runtime.presets import Frame, Preprocess, preprocess_letterbox
from ferry.runtime.providers import ProviderInfo

ImageInput = str | Path | bytes | Image.Image | np.ndarray
DEFAULT_MIN_SCORE = 0.5  # what `ferry predict`, `serve`, `batch` and `draw` show unless asked otherwise
PACKED_COLUMNS = ("x1", "y1", "x2", "y2", "score", "label")  # `infer`'s rows: one per detection slot


@dataclass(frozen=True)
class Detection:
    """One object: its box x1, y1, x2, y2 in the image's pixels, its category and score."""

    box: tuple[float, float, float, float]
    label: str
    category_id: int  # the COCO id of its category
    index: int  # the category's index in the model's labels
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "category_id": self.category_id, "index": self.index,
                "score": round(self.score, 6), "box": [round(v, 3) for v in self.box]}


@dataclass(frozen=True)
class Detections:
    """What was found in one image (best first), the image's size and what ran the model."""

    detections: tuple[Detection, ...]
    width: int
    height: int
    provider: str
    min_score: float

    def to_dict(self) -> dict[str, Any]:
        return {"detections": [d.to_dict() for d in self.detections], "width": self.width, "height": self.height,
                "min_score": self.min_score, "provider": self.provider}

    def reading(self) -> str:
        """The labels left to right (by box centre): what a line of digits reads."""
        return "".join(d.label for d in sorted(self.detections, key=lambda d: d.box[0] + d.box[2]))


@dataclass
class DetectOutcome:
    """The result for one input of a batch: its detections or the error that stopped it."""

    source: str
    result: Detections | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "ok": self.ok}
        if self.result is not None:
            d.update(self.result.to_dict())
        else:
            d["error"] = self.error
        return d


@dataclass
class Detector:
    """An exported ferry detector, loaded once, on the engine the provider names. Thread-safe like
    Classifier: nothing is mutated after construction."""

    engine: Any  # ferry.runtime.engines.Engine
    metadata: ModelMetadata
    path: Path
    provider: ProviderInfo = field(init=False)
    labels: tuple[str, ...] = field(init=False)
    spec: Preprocess = field(init=False)
    load_seconds: float = 0.0
    task = "detect"

    def __post_init__(self) -> None:
        self.provider = self.engine.info
        self.labels = self.metadata.labels
        self.spec = self.metadata.preprocess
        self.detection = self.metadata.detection
        self.category_ids = tuple(i for i, _ in self.detection.categories)
        self._input_shape = self.spec.input_shape
        self._check_model_matches_metadata()

    @classmethod
    def from_onnx(cls, path: str | Path, provider: str = "auto", *, threads: int | None = None, **session_kwargs) -> Detector:
        """Load an exported detector (`provider` and `threads` as for Classifier.from_onnx). A file
        whose task is not detect is refused with what to use instead."""
        from ferry.runtime.engines import open_engine

        t0 = time.perf_counter()
        path = Path(path)
        meta = contract.read(path)
        if meta.task != "detect":
            raise FerryError(f"{path} is a {meta.task} model ({meta.model}), not a detector")
        contract.check_coherent(path, meta)
        engine = open_engine(path, provider, meta, threads=threads, **session_kwargs)
        return cls(engine=engine, metadata=meta, path=path, load_seconds=time.perf_counter() - t0)

    def _check_model_matches_metadata(self) -> None:
        names = list(getattr(self.engine, "output_names", []))
        want = [o.name for o in self.metadata.all_outputs]
        if self.engine.n_inputs != 1 or names != want:
            raise FerryError(f"{self.path}: the graph's outputs {names} (and {self.engine.n_inputs} input(s)) do not match "
                             f"its metadata: one input and outputs {want}")
        dims = self.engine.input_dims()
        if not contract.batch_dims_fit(dims, self._input_shape):
            raise FerryError(f"{self.path}: model input {dims} does not match its metadata "
                             f"(batch, {', '.join(map(str, self._input_shape))})")
        boxes, k = self.engine.output_dims(), self.metadata.detection.max_detections
        if not contract.batch_dims_fit(boxes, (k, 4)):
            raise FerryError(f"{self.path}: the graph's boxes output {boxes} does not match its metadata (batch, {k}, 4); "
                             "export it again with this version of ferry (a detector with fewer (anchor, class) pairs "
                             "than --max-detections was written so before)")

    @property
    def name(self) -> str:
        return self.metadata.model

    @property
    def untrained(self) -> bool:
        return self.metadata.untrained

    @property
    def session(self) -> Any:
        return getattr(self.engine, "session", None)

    # --- preprocessing ------------------------------------------------------------------------

    def prepare_frame(self, image: ImageInput, name: str = "image") -> tuple[np.ndarray, Frame]:
        """One input (a path, encoded bytes, a PIL image, or an (H, W) / (H, W, 3) uint8 array) ->
        the (3, H, W) float32 letterboxed input and the Frame that maps boxes back to it."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image), name)
        elif isinstance(image, Image.Image):
            check_image(image, name)
        elif isinstance(image, np.ndarray):
            image = _array_image(image, name)
        else:
            raise ImageError(f"unsupported input type {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array")
        return preprocess_letterbox(image, self.spec)

    def prepare(self, image: ImageInput, name: str = "image") -> np.ndarray:
        return self.prepare_frame(image, name)[0]

    # --- inference ----------------------------------------------------------------------------

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The graph's detections for a checked batch, packed one row per image: (N, K, 6) float32,
        columns PACKED_COLUMNS (boxes in input pixels; label -1 for an empty slot). One array per
        batch, so a server's batcher splits it by rows as it splits logits."""
        boxes, scores, labels = self.engine.infer_all(batch)
        return np.concatenate([boxes.astype(np.float32, copy=False), scores[..., None].astype(np.float32, copy=False),
                               labels[..., None].astype(np.float32)], axis=-1)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """`infer` after checking the batch's shape, dtype and values."""
        batch = np.asarray(batch)
        want = self._input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != want or batch.shape[0] < 1:
            raise FerryError(f"batch has shape {batch.shape}; expected (N, {', '.join(map(str, want))})")
        if batch.dtype != np.float32:
            raise FerryError(f"batch dtype is {batch.dtype}; expected float32")
        if not np.isfinite(batch).all():
            raise FerryError("batch contains NaN or infinite values")
        return self.infer(np.ascontiguousarray(batch))

    def detections(self, row: np.ndarray, frame: Frame, min_score: float | None = None) -> Detections:
        """One image's packed row (K, 6) -> its Detections in its own pixels, best first, those
        scoring at least `min_score` (default DEFAULT_MIN_SCORE)."""
        threshold = DEFAULT_MIN_SCORE if min_score is None else float(min_score)
        row = np.asarray(row, dtype=np.float64).reshape(-1, len(PACKED_COLUMNS))
        keep = (row[:, 5] >= 0) & (row[:, 4] >= threshold) & (row[:, 4] > self.detection.score_threshold)
        kept = row[keep]
        kept = kept[np.argsort(-kept[:, 4], kind="stable")]
        boxes = frame.to_original(kept[:, :4])
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # a box wholly in the padding is no object
        kept, boxes = kept[inside], boxes[inside]
        out = []
        for box, score, label in zip(boxes.tolist(), kept[:, 4].tolist(), kept[:, 5].astype(int).tolist()):
            if not 0 <= label < len(self.labels):
                raise FerryError(f"{self.path}: the graph gave label {label}; its metadata lists {len(self.labels)} categories")
            out.append(Detection(tuple(box), self.labels[label], self.category_ids[label], label, score))
        return Detections(tuple(out), frame.width, frame.height, self.provider.used, threshold)

    def detect(self, image: ImageInput, *, min_score: float | None = None) -> Detections:
        """Detect objects in one input; errors raise."""
        x, frame = self.prepare_frame(image)
        return self.detections(self.infer(x[None])[0], frame, min_score)

    def detect_many(self, images: Sequence[ImageInput] | Iterable[ImageInput], *, batch_size: int = 8,
                    names: Sequence[str] | None = None, min_score: float | None = None) -> Iterator[DetectOutcome]:
        """Detect in many inputs in batches, one DetectOutcome per input, in order; a bad input is
        an outcome with its error and the others still run."""
        from ferry.runtime.classifier import _one_line

        if batch_size < 1:
            raise FerryError(f"batch size must be >= 1 (got {batch_size})")
        pending: list[tuple[int, str, np.ndarray, Frame]] = []
        results: dict[int, DetectOutcome] = {}
        next_out = 0
        for i, image in enumerate(images):
            if names is not None:
                source = names[i]
            else:
                source = str(image) if isinstance(image, (str, Path)) else f"#{i} ({type(image).__name__})"
            try:
                pending.append((i, source, *self.prepare_frame(image, source)))
            except FerryError as exc:
                results[i] = DetectOutcome(source, error=_one_line(exc, source))
            except Exception as exc:  # noqa: BLE001 - one undecodable input must not stop the batch
                results[i] = DetectOutcome(source, error=_one_line(ValueError(f"{type(exc).__name__}: {exc}"), source))
            if len(pending) >= batch_size:
                self._flush(pending, results, min_score)
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
        self._flush(pending, results, min_score)
        while next_out in results:
            yield results.pop(next_out)
            next_out += 1

    def _flush(self, pending: list, results: dict[int, DetectOutcome], min_score: float | None) -> None:
        if not pending:
            return
        rows = self.infer(np.stack([p[2] for p in pending]))
        for (i, source, _, frame), row in zip(pending, rows):
            results[i] = DetectOutcome(source, result=self.detections(row, frame, min_score))
        pending.clear()


def _array_image(arr: np.ndarray, name: str) -> Image.Image:
    """An (H, W) or (H, W, 3) uint8 array as a PIL image, checked."""
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: image array dtype is {arr.dtype}; expected uint8 (0-255)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ImageError(f"{name}: image array has shape {arr.shape}; expected (H, W) grayscale or (H, W, 3) RGB")
    return check_image(Image.fromarray(np.ascontiguousarray(arr)), name)


def open_model(path: str | Path, provider: str = "auto", *, threads: int | None = None, **session_kwargs):
    """The model at `path` as its metadata's task says: a Detector, or a Classifier."""
    from ferry.runtime.classifier import Classifier

    meta = contract.read(path)  # a broken file is named here, before any engine starts
    cls = Detector if meta.task == "detect" else Classifier
    return cls.from_onnx(path, provider, threads=threads, **session_kwargs)


# --- pictures -------------------------------------------------------------------------------------

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def draw_detections(image: Image.Image, found: Detections, *, width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with each detection's box and "label score" drawn on it."""
    from PIL import ImageDraw

    from ferry.runtime.presets import to_rgb

    out = to_rgb(image).copy()
    draw = ImageDraw.Draw(out)
    line = width or max(1, round(max(out.size) / 250))
    for d in sorted(found.detections, key=lambda d: d.score):
        color = PALETTE[d.index % len(PALETTE)]
        x1, y1, x2, y2 = d.box
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=line)
        text = f"{d.label} {d.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        ty = y1 - (bottom - top) - 3 if y1 - (bottom - top) - 3 >= 0 else y2 + 1
        draw.rectangle([x1, ty, x1 + right - left + 3, ty + bottom - top + 3], fill=color)
        draw.text((x1 + 2 - left, ty + 1 - top), text, fill=(255, 255, 255))
    return out
