"""Variants of an exported fp32 model: int8 (static QDQ, calibrated on real data) and fp16 (for
GPUs; inputs and outputs stay float32). Each records the sha256 of the fp32 file it was made from
and its accuracy (or agreement) against fp32 on held-out images in its metadata.

int8 settings are chosen to give the same answers on every x86-64 CPU class. onnxruntime's x86
kernels multiply uint8 activations by int8 weights; without VNNI (AVX2-only CPUs such as AMD Zen 3,
or AVX-512 without VNNI) they use VPMADDUBSW, whose 16-bit intermediate sums can saturate and lose
accuracy, while VNNI CPUs (VPDPBUSD) never saturate. onnxruntime's quantization guide gives the
remedy: quantize weights to 7 bits (`reduce_range=True`), which keeps every pairwise sum inside
int16. The same file then computes the same thing with or without VNNI (docs: "Export", "Portable int8").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.export import onnx_export as ox
from ferry.export.evalset import EvalSet, compare_variant
from ferry.runtime import contract
from ferry.runtime.contract import DerivedFrom, ModelMetadata

INT8_SETTINGS = {
    "format": "QDQ",
    "activations": "uint8",
    "weights": "int8 per-channel, 7-bit range (reduce_range)",
    "calibration": "MinMax",
    "why": "reduce_range keeps the uint8 x int8 products of CPUs without VNNI (VPMADDUBSW) from saturating, "
           "so the model gives the same answers on AVX2-only and VNNI CPUs",
}


class QuantizationAccuracyError(ox.ValidationError):
    """The int8 model loses more accuracy than allowed."""


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over an in-memory array."""

    def __init__(self, x: np.ndarray, batch_size: int = 50) -> None:
        self._batches = iter([x[i : i + batch_size] for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ox.INPUT_NAME: batch}


def _held_out(evaluation: EvalSet | None, eval_batches: list[np.ndarray]) -> EvalSet:
    """The real held-out images when there are any, else seeded random inputs (agreement only)."""
    if evaluation is not None and len(evaluation):
        return evaluation
    x = np.concatenate(eval_batches)
    return EvalSet(f"{len(x)} seeded random inputs (no held-out images)", x)


# The alternatives onnxruntime offers, for the portability benchmark (ferry.bench.int8_portability).
QUANT_CHOICES = {
    "U8S8 reduce_range (ferry)": ("QUInt8", "QInt8", True),
    "U8S8": ("QUInt8", "QInt8", False),
    "S8S8": ("QInt8", "QInt8", False),
    "U8U8": ("QUInt8", "QUInt8", False),
}


def quantize_int8(fp32_path: Path, target: Path, calibration: np.ndarray, *,
                  choice: str = "U8S8 reduce_range (ferry)") -> None:
    """Static QDQ quantization of `fp32_path` into `target` (INT8_SETTINGS, or another of QUANT_CHOICES)."""
    activations, weights, reduce_range = QUANT_CHOICES[choice]
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = target.with_name(target.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(target),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activations),
            weight_type=getattr(QuantType, weights),
            calibrate_method=CalibrationMethod.MinMax,
        )
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ox.ExportError(f"int8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        pre.unlink(missing_ok=True)


def make_int8(
    fp32_path: Path,
    target: Path,
    base_meta: ModelMetadata,
    calibration: np.ndarray,
    *,
    derived_from: DerivedFrom,
    evaluation: EvalSet | None,
    max_drop_pp: float | None,
    eval_batches: list[np.ndarray],
    log: Callable[[str], None] = print,
) -> ModelMetadata:
    """Write the int8 variant of `fp32_path` to `target`; gate it on labelled held-out images
    (`max_drop_pp`, None: report only). Returns its metadata."""
    log(f"quantizing to int8 (static QDQ, per-channel, reduce_range, calibrated on {len(calibration)} images)")
    quantize_int8(fp32_path, target, calibration)
    ox.check_model(target, name=target.name)
    held_out = _held_out(evaluation, eval_batches)
    vs_fp32 = compare_variant(ox.cpu_session(target), ox.cpu_session(fp32_path), held_out)
    if max_drop_pp is not None and "drop_pp" in vs_fp32 and vs_fp32["drop_pp"] > max_drop_pp:
        raise QuantizationAccuracyError(
            f"int8 accuracy {vs_fp32['accuracy']:.4%} is {vs_fp32['drop_pp']:.3f} pp below fp32 "
            f"{vs_fp32['fp32_accuracy']:.4%} on {held_out.name} (allowed {max_drop_pp} pp)"
        )
    meta = base_meta.replace(precision="int8", derived_from=derived_from, info={
        **base_meta.info,
        "quantization": {**INT8_SETTINGS, "calibration_images": int(len(calibration)), "max_drop_pp": max_drop_pp},
        "accuracy_vs_fp32": vs_fp32,
    })
    contract.write(target, meta)
    log(f"  int8 ok: {summary(vs_fp32)}")
    return meta


def make_fp16(
    fp32_path: Path,
    target: Path,
    base_meta: ModelMetadata,
    *,
    derived_from: DerivedFrom,
    evaluation: EvalSet | None,
    eval_batches: list[np.ndarray],
    log: Callable[[str], None] = print,
) -> ModelMetadata:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    log("converting to fp16 (float32 inputs and outputs)")
    try:
        proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        _topological_sort(proto.graph)  # keep_io_types appends its input casts at the end
        onnx.save(proto, str(target))
    except Exception as exc:  # noqa: BLE001
        raise ox.ExportError(f"fp16 conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    ox.check_model(target, name=target.name)
    vs_fp32 = compare_variant(ox.cpu_session(target), ox.cpu_session(fp32_path), _held_out(evaluation, eval_batches))
    vs_fp32["measured_on"] = "onnxruntime CPUExecutionProvider"
    meta = base_meta.replace(precision="fp16", derived_from=derived_from, info={
        **base_meta.info, "intended_provider": "CUDAExecutionProvider", "io_dtype": "float32", "accuracy_vs_fp32": vs_fp32})
    contract.write(target, meta)
    log(f"  fp16 ok: {summary(vs_fp32)}")
    return meta


BF16_MIN_AGREEMENT = 0.99  # unlabelled held-out images: bf16 must give fp32's top-1 on this share


class _EngineSession:
    """An engine of the runtime (OpenVINO) seen through the session interface compare_variant uses."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def get_inputs(self):
        return [type("Input", (), {"name": self.engine.input_name})()]

    def run(self, _outputs, feed: dict[str, np.ndarray]):
        (x,) = feed.values()
        return [self.engine.infer(np.ascontiguousarray(x))]


def check_bf16(fp32_path: Path, meta: ModelMetadata, *, evaluation: EvalSet | None, eval_batches: list[np.ndarray],
               max_drop_pp: float | None, capabilities: list[str] | None = None, open_bf16=None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """bf16 as a validated precision: where this CPU has bf16 instructions (OpenVINO reports "BF16"),
    run the fp32 file at bf16 on OpenVINO and gate it like int8 (labelled held-out images: at most
    `max_drop_pp` below fp32; unlabelled: the same top-1 on at least BF16_MIN_AGREEMENT of them).
    Returns `precision_checks.bf16` for the metadata: {"passed": bool, "why": ..., measurements}.
    A model without it, or with passed false, is never run at bf16. `capabilities` and `open_bf16`
    replace OpenVINO's (tests)."""
    from ferry.core.machine import cpu_class
    from ferry.runtime.openvino_engine import openvino_available

    if capabilities is None:
        if not openvino_available():
            return {"passed": False, "why": "OpenVINO was not installed where the model was exported (pip install 'ferry[openvino]')"}
        from ferry.runtime.openvino_engine import DEVICE, import_openvino

        capabilities = list(import_openvino().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in capabilities:
        return {"passed": False, "why": f"exported on a CPU without bf16 instructions (class {cpu_class()}): not measured"}
    if open_bf16 is None:
        from ferry.runtime.openvino_engine import open_openvino

        def open_bf16(path):
            return open_openvino(path, meta, bf16=True, validated=False)
    engine = open_bf16(fp32_path)
    held_out = _held_out(evaluation, eval_batches)
    vs = compare_variant(_EngineSession(engine), ox.cpu_session(fp32_path), held_out)
    engine.close()
    if "drop_pp" in vs and max_drop_pp is not None:
        passed = vs["drop_pp"] <= max_drop_pp
        rule = f"accuracy at most {max_drop_pp} pp below fp32"
    else:
        passed = vs["top1_agreement"] >= BF16_MIN_AGREEMENT
        rule = f"fp32's top-1 on at least {BF16_MIN_AGREEMENT:.0%} of the images"
    result = {"passed": bool(passed), "rule": rule, "engine": getattr(engine, "info", None) and engine.info.describe(),
              "accuracy_vs_fp32": vs, "cpu_class": cpu_class()}
    if not passed:
        result["why"] = f"bf16 missed the gate ({summary(vs)}; needed {rule})"
    log(f"  bf16 {'ok' if passed else 'not validated'}: {summary(vs)} (gate: {rule})")
    return result


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


def summary(vs: dict[str, Any]) -> str:
    if "drop_pp" in vs:
        return (f"accuracy {vs['accuracy']:.4%} vs fp32 {vs['fp32_accuracy']:.4%} ({vs['drop_pp']:+.3f} pp drop) "
                f"on {vs['dataset']}")
    return f"top-1 agreement with fp32 {vs['top1_agreement']:.2%} on {vs['dataset']}"
