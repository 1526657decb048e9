"""Export a torch model to ONNX and validate it against PyTorch (the metadata is stamped by the
model contract, `ferry.runtime.contract`).

Validation, after optimum's exporters: `onnx.checker` (full check) and shape inference, then
onnxruntime on the CPU against PyTorch on the same inputs: output names, then shapes, then
values within `atol`. Each failure is a named error carrying the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(FerryError):
    """The export itself failed (the torch exporter, or writing the file)."""


class ValidationError(ExportError):
    """The exported model does not match PyTorch (or fails onnx.checker)."""


class OutputNamesMismatch(ValidationError):
    pass


class OutputShapeMismatch(ValidationError):
    pass


class OutputValuesMismatch(ValidationError):
    pass


class PredictionMismatch(ValidationError):
    pass


def check_opset(opset: int) -> None:
    """--opset: 17 (the first with what ferry's graphs use) up to the newest the installed onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise FerryError(f"--opset must be 17 to {newest}, the newest onnx {onnx.__version__} knows (got {opset})")


def check_written_opset(path: str | Path, opset: int) -> None:
    """The exported file's default-domain opset is the one asked for: the exporter falls back (with a
    warning) where it cannot convert, and the metadata must not say otherwise."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ExportError(f"torch.onnx.export wrote opset {written}, not the {opset} asked for")


def export_to_onnx(model, example, path: str | Path, *, opset: int = DEFAULT_OPSET) -> None:
    """torch.onnx.export with the torch.export-based exporter (dynamo=True), a dynamic batch
    dimension, input `input` and output `logits`. Writes `path` (a temporary path: the caller
    renames it into place once validation passed)."""
    import torch

    model = model.eval()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={_forward_arg(model): {0: torch.export.Dim("batch", min=1, max=65536)}},
            verbose=False,
        )
        program.save(str(path))
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    check_written_opset(path, opset)


def _forward_arg(model) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    return params[0].name


def check_model(path: str | Path, *, name: str | None = None) -> None:
    """onnx.checker (full check, with shape inference) plus strict shape inference."""
    import onnx

    name = name or Path(path).name
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"onnx.checker rejected {name}: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        Path(str(path) + ".inferred").unlink(missing_ok=True)


def validation_threads() -> int:  # noqa: N802 - a constant that depends on the machine
    """onnxruntime intra-op threads of every validation session (recorded in the metadata)."""
    from ferry.runtime.providers import default_threads

    return default_threads()


def cpu_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = validation_threads()
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"onnxruntime cannot load {Path(path).name}: {str(exc).splitlines()[0][:300]}") from exc


def run_batched(session, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def torch_logits(model, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [model(torch.from_numpy(x[i : i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
        )


def compare_with_torch(path: str | Path, model, batches: Sequence[np.ndarray], *, atol: float) -> dict[str, Any]:
    """Run onnxruntime (CPU) and PyTorch on the same batches: names, shapes, values within atol."""
    session = cpu_session(path)
    names = [o.name for o in session.get_outputs()]
    if names != [OUTPUT_NAME]:
        raise OutputNamesMismatch(f"ONNX outputs are {names}, expected [{OUTPUT_NAME!r}]")
    worst = 0.0
    for x in batches:
        ours = session.run(None, {INPUT_NAME: x})[0]
        ref = torch_logits(model, x)
        if ours.shape != ref.shape:
            raise OutputShapeMismatch(f"batch {x.shape}: onnxruntime gives {ours.shape}, PyTorch {ref.shape}")
        diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
        if not np.isfinite(ours).all() or diff > atol:
            raise OutputValuesMismatch(f"batch of {len(x)}: max |onnxruntime - PyTorch| = {diff:.3g} > atol {atol:g}")
        worst = max(worst, diff)
    return {"batch_sizes": [int(len(x)) for x in batches], "max_abs_diff": worst, "atol": atol}
