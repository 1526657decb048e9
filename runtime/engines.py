"""The engines that run a model file: onnxruntime (CPU, CUDA, TensorRT) and OpenVINO (CPU; f32,
or bf16 where the CPU has it and the model's bf16 accuracy was validated at export).

`open_engine(path, provider, meta)` returns an `Engine`: `infer(batch)` gives the logits of a
prepared, checked batch (`infer_all`: every output, for a detector's boxes, scores and labels),
and `info` says what actually runs it, read back from the engine (the
provider onnxruntime's session reports; the device and inference precision OpenVINO's compiled
model reports). A provider that was asked for and cannot run is a ProviderError with the reason,
never a quiet fallback; `auto` chooses (ferry.runtime.auto) and says why in `info.note`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ferry.runtime.contract import ModelMetadata
from ferry.runtime.providers import ORT_PROVIDERS, ProviderError, ProviderInfo, create_session

OPENVINO = "openvino"
OPENVINO_BF16 = "openvino-bf16"
CHOICES = ("auto", *ORT_PROVIDERS, OPENVINO, OPENVINO_BF16)


class Engine(Protocol):
    info: ProviderInfo
    input_name: str
    output_name: str
    output_names: list[str]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a C-contiguous float32 batch of the model's input shape."""

    def infer_one(self, sample: np.ndarray) -> np.ndarray:
        """Logits (1, classes) of one prepared (C, H, W) float32 sample of the model's shape. The
        array may be a buffer of the calling thread's that its next `infer_one` overwrites: read or
        copy it before the thread's next call."""

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output, in the graph's order, for such a batch."""

    def input_dims(self) -> list[Any]:
        """The model input's dimensions as the engine sees them (ints, or names/None when dynamic)."""

    def output_dims(self) -> list[Any]:
        """The first output's dimensions."""

    def close(self) -> None:
        """Release the engine's threads and memory now (the benchmark keeps one engine alive at a time)."""


class OrtEngine:
    """An onnxruntime InferenceSession. On a GPU provider the input is copied to the device and the
    logits back to the host inside `infer`, through IO binding. On the CPU, `infer_one` (one sample,
    `Classifier.predict`) runs through buffers each thread binds once (`_BoundOne`)."""

    def __init__(self, session: Any, info: ProviderInfo) -> None:
        self.session, self.info = session, info
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self._outputs = [self.output_name]
        self.n_inputs, self.n_outputs = len(session.get_inputs()), len(session.get_outputs())
        self._gpu = info.is_gpu
        self._local = threading.local()
        self._one = None if self._gpu else _bindable(session)  # ((C, H, W), classes) where `infer_one` can bind

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._gpu:
            return self._run_io_binding(batch, self._outputs)[0]
        return self.session.run(self._outputs, {self.input_name: batch})[0]

    def infer_one(self, sample: np.ndarray) -> np.ndarray:
        # On the CPU: the sample is copied into this thread's bound input and the logits land in its
        # bound output, so a call makes no onnxruntime values or arrays of its own (with a digit-sized
        # model that is a good part of what `session.run` costs beside the model).
        one = self._one
        if one is None or sample.shape != one[0] or sample.dtype != np.float32:
            return self.infer(sample[None])  # (copyto would broadcast or cast: onnxruntime judges it)
        try:
            bound = self._local.bound
        except AttributeError:
            bound = self._local.bound = _BoundOne(self.session, self.input_name, self.output_name, *one)
        np.copyto(bound.input, sample)
        bound.run(bound.binding)
        return bound.output

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._gpu:
            return self._run_io_binding(batch, self.output_names)
        return self.session.run(self.output_names, {self.input_name: batch})

    def _run_io_binding(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        # IO binding: the input is copied to the GPU once and the outputs are allocated there, so
        # onnxruntime does not stage copies through its own CPU buffers on every call.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def input_dims(self) -> list[Any]:
        return list(self.session.get_inputs()[0].shape)

    def output_dims(self) -> list[Any]:
        return list(self.session.get_outputs()[0].shape)

    def close(self) -> None:
        self.session = None
        self._local = threading.local()  # the bindings hold the session


def _bindable(session: Any) -> tuple[tuple[int, ...], int] | None:
    """((C, H, W), classes) of a model whose first input is float32 (batch, C, H, W) and whose first
    output is float32 (batch, classes), all but the batch fixed: what `_BoundOne` can bind; None
    otherwise (ferry's fp32, int8 and fp16 files all have float32 inputs and outputs)."""
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    dims, width = list(inp.shape), list(out.shape)
    if inp.type != "tensor(float)" or out.type != "tensor(float)" or len(dims) != 4 or len(width) != 2:
        return None
    fixed = [*dims[1:], width[1]]
    if not all(isinstance(d, int) and d > 0 for d in fixed):
        return None
    return tuple(fixed[:3]), fixed[3]


class _BoundOne:
    """One thread's IO binding for one sample: an input buffer (1, C, H, W) and an output buffer
    (1, classes) bound to the session once; `run(binding)` fills the output from the input."""

    def __init__(self, session: Any, input_name: str, output_name: str, shape: tuple[int, ...], classes: int) -> None:
        self.shape = shape
        self._batch = np.zeros((1, *shape), np.float32)  # kept alive with the binding that points at it
        self.output = np.zeros((1, classes), np.float32)
        self.input = self._batch[0]
        self.binding = session.io_binding()
        self.binding.bind_input(input_name, "cpu", 0, np.float32, list(self._batch.shape), self._batch.ctypes.data)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, list(self.output.shape), self.output.ctypes.data)
        self.run = session.run_with_iobinding


def open_engine(path: str | Path, provider: str, meta: ModelMetadata, *, threads: int | None = None,
                **session_kwargs: Any) -> Engine:
    """The engine `provider` names for the model at `path` (its metadata `meta`, already checked)."""
    if provider not in CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(CHOICES)}")
    if threads is not None and threads < 1:
        raise ProviderError(f"threads must be >= 1 (got {threads})")
    if provider in (OPENVINO, OPENVINO_BF16):
        from ferry.runtime.openvino_engine import open_openvino

        return open_openvino(path, meta, bf16=provider == OPENVINO_BF16, threads=threads)
    if provider == "auto":
        from ferry.runtime.auto import open_auto

        return open_auto(path, meta, threads=threads, **session_kwargs)
    session, info = create_session(path, provider, threads=threads, precision=meta.precision, **session_kwargs)
    return OrtEngine(session, info)
