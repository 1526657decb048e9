"""OpenVINO as a second engine of the runtime (`pip install 'ferry[openvino]'`): the same `.onnx`
files (fp32, and the int8 QDQ file), on the CPU.

Precision is chosen knowingly, never by OpenVINO's default (which is bf16 on CPUs that have it):
`f32` unless bf16 is asked for, and bf16 only where the CPU has bf16 instructions and the model's
bf16 accuracy was validated at export (`precision_checks.bf16` in its metadata). The precision and
threads actually used are read back from the compiled model; a bf16 request that does not read
back as bf16 is an error, not a quiet f32 run.

One compiled model serves many threads: each call takes an infer request from a pool (an infer
request is not thread-safe; the compiled model is), so one Classifier can be shared by threads.
"""

from __future__ import annotations

import queue
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ferry.runtime.contract import ModelMetadata
from ferry.runtime.providers import ProviderError, ProviderInfo, default_threads

DEVICE = "CPU"
USED = "OpenVINO:CPU"
INSTALL = "pip install 'ferry[openvino]'"


def import_openvino() -> ModuleType:
    try:
        import openvino
    except ImportError as exc:
        raise ProviderError(f"--provider openvino needs OpenVINO, which is not installed: {INSTALL}") from exc
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except ProviderError:
        return False
    return True


def bf16_status(meta: ModelMetadata, *, capabilities: list[str] | None = None) -> tuple[bool, str]:
    """(whether bf16 may run this model here, why not). bf16 needs a CPU with bf16 instructions
    (avx512_bf16 or AMX, as OpenVINO reports them: "BF16" among the CPU's optimization capabilities),
    the fp32 file, and the model's bf16 accuracy validated at export."""
    from ferry.core.machine import cpu_class

    if capabilities is None:
        capabilities = list(import_openvino().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in capabilities:
        return False, f"this CPU (class {cpu_class()}) has no bf16 instructions (avx512_bf16 or AMX)"
    if meta.precision != "fp32":
        return False, f"bf16 runs the fp32 file, not the {meta.precision} one"
    check = (meta.info.get("precision_checks") or {}).get("bf16") or {}
    if check.get("passed") is not True:
        why = check.get("why") or "it was exported on a CPU without bf16, or before ferry checked bf16"
        return False, f"the model's bf16 accuracy was not validated at export ({why}); re-export it on a bf16 CPU"
    return True, ""


class OpenVinoEngine:
    """A compiled OpenVINO model and a pool of infer requests."""

    def __init__(self, compiled: Any, info: ProviderInfo, ov: ModuleType) -> None:
        self.compiled, self.info, self._ov = compiled, info, ov
        self.input_name = compiled.input(0).any_name
        self.output_name = compiled.output(0).any_name
        self.output_names = [o.any_name for o in compiled.outputs]
        self.n_inputs, self.n_outputs = len(compiled.inputs), len(compiled.outputs)
        self._pool: queue.SimpleQueue = queue.SimpleQueue()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, 1)[0]

    def infer_one(self, sample: np.ndarray) -> np.ndarray:
        return self._run(sample[None], 1)[0]

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return self._run(batch, len(self.output_names))

    def _run(self, batch: np.ndarray, n_outputs: int) -> list[np.ndarray]:
        try:
            request = self._pool.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))  # no copy of the batch
            request.infer()
            # copies: the request's own buffers are reused by the next call
            return [request.get_output_tensor(i).data.copy() for i in range(n_outputs)]
        finally:
            self._pool.put(request)

    def input_dims(self) -> list[Any]:
        return _dims(self.compiled.input(0).partial_shape)

    def output_dims(self) -> list[Any]:
        return _dims(self.compiled.output(0).partial_shape)

    def close(self) -> None:
        self._pool = queue.SimpleQueue()
        self.compiled = None


def _dims(shape: Any) -> list[Any]:
    return [d.get_length() if d.is_static else None for d in shape]


_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def open_openvino(path: str | Path, meta: ModelMetadata, *, bf16: bool = False, threads: int | None = None,
                  validated: bool = True) -> OpenVinoEngine:
    """Compile the model at `path` for the CPU at f32 (or bf16, where allowed) and read back what it
    runs. `validated=False` skips the metadata's bf16 check: only export's own bf16 measurement does."""
    ov = import_openvino()
    requested = "openvino-bf16" if bf16 else "openvino"
    if bf16 and validated:
        ok, why = bf16_status(meta)
        if not ok:
            raise ProviderError(f"--provider {requested} cannot run: {why}")
    threads = threads or default_threads()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(path)), DEVICE, config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise ProviderError(f"OpenVINO cannot compile {path}: {message}") from exc
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
    arithmetic = _PRECISION.get(hint, hint)
    if bf16 and arithmetic != "bf16":
        raise ProviderError(f"--provider {requested} cannot run: OpenVINO compiled the model at {arithmetic}, not bf16")
    precision = "int8" if meta.precision == "int8" else arithmetic
    info = ProviderInfo(requested, USED, (USED,), threads=int(compiled.get_property("INFERENCE_NUM_THREADS")),
                        engine="openvino", precision=precision,
                        note=f"OpenVINO {ov.__version__}, inference precision {arithmetic} (read back)")
    return OpenVinoEngine(compiled, info, ov)
