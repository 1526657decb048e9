"""Variants of an exported fp32 model: int8 (static QDQ, calibrated on real data) and fp16 (for
GPUs; inputs and outputs stay float32). Each records its accuracy against fp32 in its metadata."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path
from ferry.export import onnx_export as ox
from ferry.export.digits import MnistEval, accuracy


class QuantizationAccuracyError(ox.ValidationError):
    """The int8 model loses more accuracy than allowed."""


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over an in-memory array."""

    def __init__(self, x: np.ndarray, batch_size: int = 50) -> None:
        self._batches = iter([x[i : i + batch_size] for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ox.INPUT_NAME: batch}


def _agreement(variant, reference, batches: list[np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement and max |logit difference| of a variant against the fp32 model."""
    agree = total = 0
    worst = 0.0
    for x in batches:
        a, b = ox.run_batched(variant, x, 64), ox.run_batched(reference, x, 64)
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(x)
        worst = max(worst, float(np.abs(a - b).max()))
    return {"images": total, "top1_agreement": agree / total, "max_abs_logit_diff": worst}


def _mnist_comparison(variant, reference, mnist: MnistEval) -> dict[str, Any]:
    ours = ox.run_batched(variant, mnist.test_x)
    ref = ox.run_batched(reference, mnist.test_x)
    acc, acc_ref = accuracy(ours, mnist.test_y), accuracy(ref, mnist.test_y)
    return {
        "dataset": f"MNIST test ({len(mnist.test_y)} images)",
        "accuracy": acc,
        "fp32_accuracy": acc_ref,
        "drop_pp": round(100 * (acc_ref - acc), 4),
        "top1_agreement": float((ours.argmax(1) == ref.argmax(1)).mean()),
    }


def make_int8(
    fp32_path: Path,
    base_meta: dict[str, Any],
    calib: np.ndarray,
    *,
    mnist: MnistEval | None,
    max_drop_pp: float,
    eval_batches: list[np.ndarray],
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = fp32_path.with_name(f"{base_meta['model']}.int8.onnx")
    log(f"quantizing to int8 (static QDQ, per-channel, calibrated on {len(calib)} images) -> {target}")
    with atomic_path(target) as tmp:
        pre = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(tmp),
                _Reader(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except FerryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ox.ExportError(f"int8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        finally:
            pre.unlink(missing_ok=True)
        ox.check_model(tmp, name=target.name)
        variant, reference = ox.cpu_session(tmp), ox.cpu_session(fp32_path)
        if mnist is not None:
            vs_fp32 = _mnist_comparison(variant, reference, mnist)
            if vs_fp32["drop_pp"] > max_drop_pp:
                raise QuantizationAccuracyError(
                    f"int8 accuracy {vs_fp32['accuracy']:.4%} is {vs_fp32['drop_pp']:.3f} pp below fp32 "
                    f"{vs_fp32['fp32_accuracy']:.4%} (allowed {max_drop_pp} pp)"
                )
        else:
            vs_fp32 = _agreement(variant, reference, [calib, *eval_batches])
        meta = {
            **base_meta,
            "precision": "int8",
            "quantization": {"format": "QDQ", "activations": "uint8", "weights": "int8 per-channel",
                             "calibration": "MinMax", "calibration_images": int(len(calib))},
            "accuracy_vs_fp32": vs_fp32,
        }
        ox.write_metadata(tmp, meta)
    log(f"  int8 ok: {_summary(vs_fp32)}")
    return target, meta


def make_fp16(
    fp32_path: Path,
    base_meta: dict[str, Any],
    *,
    mnist: MnistEval | None,
    eval_batches: list[np.ndarray],
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = fp32_path.with_name(f"{base_meta['model']}.fp16.onnx")
    log(f"converting to fp16 (float32 inputs and outputs) -> {target}")
    with atomic_path(target) as tmp:
        try:
            proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
            _topological_sort(proto.graph)  # keep_io_types appends its input casts at the end
            onnx.save(proto, str(tmp))
        except Exception as exc:  # noqa: BLE001
            raise ox.ExportError(f"fp16 conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        ox.check_model(tmp, name=target.name)
        variant, reference = ox.cpu_session(tmp), ox.cpu_session(fp32_path)
        vs_fp32 = _mnist_comparison(variant, reference, mnist) if mnist is not None else _agreement(variant, reference, eval_batches)
        vs_fp32["measured_on"] = "onnxruntime CPUExecutionProvider"
        meta = {**base_meta, "precision": "fp16", "intended_provider": "CUDAExecutionProvider",
                "io_dtype": "float32", "accuracy_vs_fp32": vs_fp32}
        ox.write_metadata(tmp, meta)
    log(f"  fp16 ok: {_summary(vs_fp32)}")
    return target, meta


def _topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ox.ExportError("fp16 graph has a cycle or an input nothing produces")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if not any(n is r for r in ready)]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _summary(vs: dict[str, Any]) -> str:
    if "drop_pp" in vs:
        return f"accuracy {vs['accuracy']:.4%} vs fp32 {vs['fp32_accuracy']:.4%} ({vs['drop_pp']:+.3f} pp drop)"
    return f"top-1 agreement with fp32 {vs['top1_agreement']:.2%} on {vs['images']} inputs"
