"""Classifier: load an exported ferry model once and predict from files, PIL images or arrays.

    clf = Classifier.from_onnx("models/resnet50.onnx", provider="auto")
    clf.predict("cat.jpg", top_k=5)        # -> Prediction
    clf.run(batch)                          # raw logits for prepared (N, C, H, W) float32 tensors

One instance may be shared by threads: nothing here mutates state after construction, and each
engine is thread-safe (ferry.runtime.engines).
"""

from __future__ import annotations

import math
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
from ferry.runtime.presets import (
    MNIST_SIZE,
    Preprocess,
    mnist_uint8_passthrough,
    normalize_unit_digit,
    preprocess,
    standardize_digit,
)
from ferry.runtime.providers import ProviderInfo

ImageInput = str | Path | bytes | Image.Image | np.ndarray
SMALL_HEAD = 64  # up to this many classes one prediction's softmax runs in plain Python
MODEL_OUTPUT_NAN = "the model's output holds NaN or infinity (a numerical overflow: an fp16 model out of its range?)"


class ModelOutputError(FerryError):
    """The model gave logits with no probabilities in them (NaN, +inf): not a prediction."""


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability}


@dataclass(frozen=True, slots=True)
class Prediction:
    index: int
    label: str
    probability: float
    top_k: tuple[Candidate, ...]
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability,
                "top_k": [c.to_dict() for c in self.top_k], "provider": self.provider}


# Filling a frozen object field by field through its slots: the same object `Candidate(...)` makes,
# without the frozen `__init__`'s one `object.__setattr__` call per field, a cost that shows at
# batch 1 of a small model. (Slots: no per-object dict to allocate either.)
_CANDIDATE_SLOTS = (Candidate.index.__set__, Candidate.label.__set__, Candidate.probability.__set__)  # type: ignore[attr-defined]
_PREDICTION_SLOTS = (Prediction.index.__set__, Prediction.label.__set__, Prediction.probability.__set__,  # type: ignore[attr-defined]
                     Prediction.top_k.__set__, Prediction.provider.__set__)  # type: ignore[attr-defined]


@dataclass
class Outcome:
    """The result for one input of a batch: a prediction or the error that stopped it."""

    source: str
    prediction: Prediction | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "ok": self.ok}
        if self.prediction:
            d.update(self.prediction.to_dict())
        else:
            d["error"] = self.error
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Classifier:
    """An exported ferry model, loaded once, on the engine the provider names. Thread-safe: one
    instance may be shared by threads (onnxruntime's `run` is thread-safe; the OpenVINO engine
    gives each call its own infer request)."""

    engine: Any  # ferry.runtime.engines.Engine
    metadata: ModelMetadata
    path: Path
    provider: ProviderInfo = field(init=False)
    labels: tuple[str, ...] = field(init=False)
    spec: Preprocess = field(init=False)
    input_name: str = field(init=False)
    output_name: str = field(init=False)
    load_seconds: float = 0.0
    task = "classify"  # (a class attribute: ferry.runtime.detector.Detector's is "detect")

    def __post_init__(self) -> None:
        self.provider = self.engine.info
        self.labels = self.metadata.labels
        self.spec = self.metadata.preprocess
        self.input_name, self.output_name = self.engine.input_name, self.engine.output_name
        self._input_shape = self.spec.input_shape
        self._labels = list(self.labels)
        self._mnist = self.spec.kind == "mnist"
        self._check_model_matches_metadata()

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_onnx(cls, path: str | Path, provider: str = "auto", *, threads: int | None = None, **session_kwargs) -> Classifier:
        """Load an exported model. `provider`: auto (CUDA where it works, else the fastest validated
        CPU engine for this model on this CPU, cached: ferry.runtime.auto), cpu, cuda, tensorrt
        (onnxruntime), openvino or openvino-bf16. `threads`: intra-op threads (default: the physical
        cores); other keywords go to onnxruntime's `create_session`. The model's metadata is read and
        checked first (`contract.read`: a MetadataError names the file and the field); a variant
        (int8/fp16) whose fp32 sibling has changed since it was made is refused (IncoherentModelSet)."""
        from ferry.runtime.engines import open_engine

        t0 = time.perf_counter()
        path = Path(path)
        meta = contract.read(path)  # before the engine: a foreign or broken file is named as such
        if meta.task != "classify":
            raise FerryError(f"{path} is a detector ({meta.model}), not a classifier: load it with "
                             "ferry.runtime.Detector (or ferry.runtime.open_model)")
        contract.check_coherent(path, meta)
        engine = open_engine(path, provider, meta, threads=threads, **session_kwargs)
        return cls(engine=engine, metadata=meta, path=path, load_seconds=time.perf_counter() - t0)

    @property
    def session(self) -> Any:
        """The onnxruntime InferenceSession (None on OpenVINO)."""
        return getattr(self.engine, "session", None)

    def _check_model_matches_metadata(self) -> None:
        n_in, n_out = self.engine.n_inputs, self.engine.n_outputs
        if n_in != 1 or n_out < 1:
            raise FerryError(f"{self.path}: expected one input and one output, found {n_in} and {n_out}")
        dims = self.engine.input_dims()
        want = list(self._input_shape)
        if not contract.batch_dims_fit(dims, want):
            raise FerryError(f"{self.path}: model input {dims} does not match its metadata (batch, {', '.join(map(str, want))})")
        width = self.engine.output_dims()[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise FerryError(f"{self.path}: model has {width} outputs but its metadata lists {len(self.labels)} labels")

    @property
    def untrained(self) -> bool:
        return self.metadata.untrained

    @property
    def name(self) -> str:
        return self.metadata.model

    # --- preprocessing ----------------------------------------------------------------------

    def prepare(self, image: ImageInput, name: str = "image") -> np.ndarray:
        """One input (a path, the bytes of an encoded image, a PIL image or an array) -> a (C, H, W)
        float32 array as the model expects. `name` labels errors for bytes."""
        if isinstance(image, np.ndarray):  # first: the in-process caller's case, where each step shows
            if self._mnist and image.dtype.char == "B" and image.shape == (MNIST_SIZE, MNIST_SIZE):  # uint8 28x28
                fast = mnist_uint8_passthrough(image, self.spec)  # an MNIST-like digit: one table lookup
                if fast is not None:
                    return fast
            image = _check_array(image, self.spec.kind)
            if self.spec.kind == "mnist":  # checked above: 2-D float32 in [0, 1]
                return standardize_digit(normalize_unit_digit(image), self.spec)
        elif isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image), name)
        elif isinstance(image, Image.Image):
            check_image(image)
        else:
            raise ImageError(f"unsupported input type {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array")
        return preprocess(image, self.spec)

    # --- inference --------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a prepared (N, C, H, W) float32 batch, checked first."""
        batch = np.asarray(batch)
        want = self._input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != want or batch.shape[0] < 1:
            raise FerryError(f"batch has shape {batch.shape}; expected (N, {', '.join(map(str, want))})")
        if batch.dtype != np.float32:
            raise FerryError(f"batch dtype is {batch.dtype}; expected float32")
        if not np.isfinite(batch).all():
            raise FerryError("batch contains NaN or infinite values")
        return self.infer(np.ascontiguousarray(batch))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch the caller has already checked (C-contiguous float32 of the model's
        shape): `run` without its checks. On a GPU provider the input is copied to the device and
        the logits back to the host, inside this call."""
        return self.engine.infer(batch)

    def predict_batch(self, prepared: np.ndarray, top_k: int = 1) -> list[Prediction]:
        return self.predictions(self.run(prepared), top_k)

    def predictions(self, logits: np.ndarray, top_k: int = 1) -> list[Prediction]:
        """Softmax and the top-k candidates of each row of (N, classes) logits (in float64)."""
        logits = np.asarray(logits)
        if logits.ndim == 1:
            logits = logits[None]
        k = max(1, min(top_k, logits.shape[1]))
        if logits.shape[0] == 1 and logits.shape[1] <= SMALL_HEAD:
            return [self._one_small(logits[0].tolist(), k)]
        logits = logits.astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        total = z.sum(axis=1, keepdims=True)
        if np.isnan(total).any():  # a NaN or +inf logit: no probabilities to give
            raise ModelOutputError(MODEL_OUTPUT_NAN)
        z /= total
        order = z.argmax(axis=1)[:, None] if k == 1 else top_k_order(z, k)
        labels, used = self._labels, self.provider.used
        out = []
        for row, idx in zip(np.take_along_axis(z, order, axis=1).tolist(), order.tolist()):  # k values a row, not all
            cands = tuple(Candidate(i, labels[i], p) for i, p in zip(idx, row))
            out.append(Prediction(idx[0], labels[idx[0]], row[0], cands, used))
        return out

    def _one_small(self, row: list[float], k: int) -> Prediction:
        """One row of a few logits in plain Python (cheaper than numpy's per-call cost at this size):
        the same float64 softmax, ties broken towards the lower index as argsort's stable order does
        (a reverse sort keeps equal items in their order)."""
        peak = max(row)
        exp = math.exp
        e = [exp(v - peak) for v in row]
        total = sum(e)
        if total != total:  # NaN: a NaN or +inf logit
            raise ModelOutputError(MODEL_OUTPUT_NAN)
        probs = [v / total for v in e]
        labels = self._labels
        new = object.__new__
        set_index, set_label, set_probability = _CANDIDATE_SLOTS
        # top 1: the first of equal maxima (the lower index); else a reverse sort, which keeps ties in order
        order = [probs.index(max(probs))] if k == 1 else sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]
        made = []
        for i in order:
            c = new(Candidate)
            set_index(c, i)
            set_label(c, labels[i])
            set_probability(c, probs[i])
            made.append(c)
        cands = tuple(made)
        first = made[0]
        pred = new(Prediction)
        p_index, p_label, p_probability, p_top_k, p_provider = _PREDICTION_SLOTS
        p_index(pred, first.index)
        p_label(pred, first.label)
        p_probability(pred, first.probability)
        p_top_k(pred, cands)
        p_provider(pred, self.provider.used)
        return pred

    def predict(self, image: ImageInput, top_k: int = 1) -> Prediction:
        """Predict one input (path, bytes, PIL image or array); errors raise. `prepare` returns a
        checked array of the model's shape, so it goes to the engine without `run`'s checks. A few
        classes take the plain-Python softmax straight away: at batch 1 of a small model the
        runtime's own steps are a good part of the call, so each one it skips counts."""
        logits = self.engine.infer_one(self.prepare(image))  # (maybe this thread's buffer: read here, not kept)
        if logits.ndim == 2 and logits.shape[0] == 1 and logits.shape[1] <= SMALL_HEAD:
            return self._one_small(logits[0].tolist(), max(1, min(top_k, logits.shape[1])))
        return self.predictions(logits, top_k)[0]

    def predict_many(self, images: Sequence[ImageInput] | Iterable[ImageInput], *, top_k: int = 1,
                     batch_size: int = 32, names: Sequence[str] | None = None) -> Iterator[Outcome]:
        """Predict many inputs in batches, yielding one Outcome per input, in order. A bad input
        yields an Outcome with its error; the others are still predicted. `names` label the inputs
        (default: the path, or "#i (type)")."""
        pending: list[tuple[int, str, np.ndarray]] = []
        results: dict[int, Outcome] = {}
        next_out = 0
        for i, image in enumerate(images):
            if names is not None:
                source = names[i]
            else:
                source = str(image) if isinstance(image, (str, Path)) else f"#{i} ({type(image).__name__})"
            try:
                pending.append((i, source, self.prepare(image, source)))
            except FerryError as exc:
                results[i] = Outcome(source, error=_one_line(exc, source))
            except Exception as exc:  # noqa: BLE001 - one undecodable input must not stop the batch
                results[i] = Outcome(source, error=_one_line(ValueError(f"{type(exc).__name__}: {exc}"), source))
            if len(pending) >= batch_size:
                self._flush(pending, results, top_k)
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
        self._flush(pending, results, top_k)
        while next_out in results:
            yield results.pop(next_out)
            next_out += 1

    def _flush(self, pending: list, results: dict[int, Outcome], top_k: int) -> None:
        if not pending:
            return
        got = self.outcomes(self.run(np.stack([p[2] for p in pending])), [p[1] for p in pending], top_k)
        for (i, _, _), outcome in zip(pending, got):
            results[i] = outcome
        pending.clear()

    def outcomes(self, logits: np.ndarray, sources: Sequence[str], top_k: int = 1) -> list[Outcome]:
        """One Outcome per row of (N, classes) logits: its prediction, or, for a row with no
        probabilities in it (NaN, +inf, all -inf), that input's error, not the whole batch's."""
        logits = np.asarray(logits)
        broken = ~np.isfinite(logits.max(axis=1))
        preds = iter(self.predictions(logits[~broken], top_k) if not broken.all() else [])
        return [Outcome(s, error=f"{s}: {MODEL_OUTPUT_NAN}") if bad else Outcome(s, prediction=next(preds))
                for s, bad in zip(sources, broken.tolist())]


def top_k_order(z: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's `k` largest values, largest first, ties towards the lower index:
    `np.argsort(-z, axis=1, kind="stable")[:, :k]`, without sorting whole rows of a batch of many
    classes. A partition finds each row's k-th largest value; the k indices at or above it
    (ascending) are then sorted stably by value, so the result is the full sort's. A row with more
    than k there (a tie at the cut) takes the full sort alone; NaN (which a partition does not order
    like the sort), a few classes or one row (where numpy's per-call costs outweigh the sort), the
    whole batch."""
    def full(rows: np.ndarray) -> np.ndarray:
        return np.argsort(-rows, axis=1, kind="stable")[:, :k]

    n = z.shape[1]
    if z.shape[0] == 1 or n <= SMALL_HEAD or k >= n or np.isnan(z).any():
        return full(z)
    above = z >= np.partition(z, n - k, axis=1)[:, n - k:n - k + 1]  # at least k a row
    exact = above.sum(axis=1) == k
    out = np.empty((z.shape[0], k), np.intp)
    if exact.any():
        cand = np.nonzero(above[exact])[1].reshape(-1, k)  # row by row, each row's indices ascending
        rows = z[exact]
        out[exact] = np.take_along_axis(cand, np.argsort(-np.take_along_axis(rows, cand, axis=1), axis=1, kind="stable"),
                                        axis=1)
    if not exact.all():  # rows with a tie at the cut (an int8 model's few levels): those rows fully sorted
        out[~exact] = full(z[~exact])
    return out


def _one_line(exc: Exception, source: str) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg if msg.startswith(source) else f"{source}: {msg}"


def _check_array(arr: np.ndarray, kind: str) -> np.ndarray:
    if arr.dtype.kind not in "uif":
        raise ImageError(f"array dtype {arr.dtype} is not a number type")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError("array contains NaN or infinite values")
    if kind == "mnist":
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ImageError(f"digit array has shape {arr.shape}; expected (H, W) grayscale")
    else:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageError(f"image array has shape {arr.shape}; expected (H, W, 3) RGB")
        if arr.dtype != np.uint8:
            raise ImageError(f"image array dtype is {arr.dtype}; expected uint8 (0-255)")
        arr = Image.fromarray(arr)
        check_image(arr)
        return arr
    if min(arr.shape) < 8:
        raise ImageError(f"array is {arr.shape[1]}x{arr.shape[0]}; at least 8x8 pixels are needed")
    # a digit array becomes float32 in [0, 1]: uint8 / 255; other integers by 255 or their range
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        out /= np.float32(255)
        return out
    if arr.dtype.kind in "ui":
        return arr.astype(np.float32) / np.float32(255.0 if arr.max(initial=0) <= 255 else float(np.iinfo(arr.dtype).max))
    out = arr.astype(np.float32, copy=False)
    return out / np.float32(255.0) if out.max(initial=0) > 1.0 else out

