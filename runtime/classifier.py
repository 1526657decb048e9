"""Classifier: load an exported ferry model once and predict from files, PIL images or arrays.

    clf = Classifier.from_onnx("models/resnet50.onnx", provider="auto")
    clf.predict("cat.jpg", top_k=5)        # -> Prediction
    clf.run(batch)                          # raw logits for prepared (N, C, H, W) float32 tensors

One instance may be shared by threads: onnxruntime's `run` is thread-safe and nothing here
mutates state after construction.
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
from ferry.runtime.presets import Preprocess, preprocess
from ferry.runtime.providers import ProviderInfo, create_session

ImageInput = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Candidate:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float
    top_k: tuple[Candidate, ...]
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability,
                "top_k": [c.__dict__ for c in self.top_k], "provider": self.provider}


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
    session: Any
    provider: ProviderInfo
    metadata: ModelMetadata
    path: Path
    labels: tuple[str, ...] = field(init=False)
    spec: Preprocess = field(init=False)
    input_name: str = field(init=False)
    output_name: str = field(init=False)
    load_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.labels = self.metadata.labels
        self.spec = self.metadata.preprocess
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._check_model_matches_metadata()

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_onnx(cls, path: str | Path, provider: str = "auto", *, threads: int | None = None, **session_kwargs) -> Classifier:
        """Load an exported model. `threads`: onnxruntime intra-op threads (default: the physical
        cores); other keywords go to `create_session`. The model's metadata is read and checked
        first (`contract.read`: a MetadataError names the file and the field); a variant (int8/fp16)
        whose fp32 sibling has changed since it was made is refused (IncoherentModelSet)."""
        t0 = time.perf_counter()
        path = Path(path)
        meta = contract.read(path)  # before the session: a foreign or broken file is named as such
        contract.check_coherent(path, meta)
        session, info = create_session(path, provider, threads=threads, **session_kwargs)
        return cls(session=session, provider=info, metadata=meta, path=path, load_seconds=time.perf_counter() - t0)

    def _check_model_matches_metadata(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise FerryError(f"{self.path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        want = list(self.spec.input_shape)
        got = list(inputs[0].shape[1:])
        if len(inputs[0].shape) != 4 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise FerryError(f"{self.path}: model input {inputs[0].shape} does not match its metadata (batch, {', '.join(map(str, want))})")
        n_out = outputs[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.labels):
            raise FerryError(f"{self.path}: model has {n_out} outputs but its metadata lists {len(self.labels)} labels")

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
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image), name)
        elif isinstance(image, Image.Image):
            check_image(image)
        elif isinstance(image, np.ndarray):
            image = _check_array(image, self.spec.kind)
        else:
            raise ImageError(f"unsupported input type {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array")
        return preprocess(image, self.spec)

    # --- inference --------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a prepared (N, C, H, W) float32 batch."""
        batch = np.asarray(batch)
        want = self.spec.input_shape
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
        if self.provider.is_gpu:
            return self._run_io_binding(batch)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def _run_io_binding(self, batch: np.ndarray) -> np.ndarray:
        # IO binding: the input is copied to the GPU once and the output is allocated there, so
        # onnxruntime does not stage copies through its own CPU buffers on every call.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict_batch(self, prepared: np.ndarray, top_k: int = 1) -> list[Prediction]:
        return self.predictions(self.run(prepared), top_k)

    def predictions(self, logits: np.ndarray, top_k: int = 1) -> list[Prediction]:
        """Softmax and the top-k candidates of each row of (N, classes) logits."""
        probs = softmax(np.asarray(logits, dtype=np.float64))
        k = max(1, min(top_k, probs.shape[1]))
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            cands = tuple(Candidate(int(i), self.labels[int(i)], float(row[i])) for i in order)
            out.append(Prediction(cands[0].index, cands[0].label, cands[0].probability, cands, self.provider.used))
        return out

    def predict(self, image: ImageInput, top_k: int = 1) -> Prediction:
        """Predict one input (path, PIL image or array); errors raise."""
        return self.predict_batch(self.prepare(image)[None], top_k)[0]

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
        preds = self.predict_batch(np.stack([p[2] for p in pending]), top_k)
        for (i, source, _), pred in zip(pending, preds):
            results[i] = Outcome(source, prediction=pred)
        pending.clear()


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
    if arr.dtype.kind in "ui":
        arr = arr.astype(np.float32) / (255.0 if arr.max(initial=0) <= 255 else float(np.iinfo(arr.dtype).max))
    return arr

