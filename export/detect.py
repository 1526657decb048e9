"""Export a detector to validated ONNX: `ferry export ARCH --checkpoint CK` (trained by `ferry train
--task detect`) or `ferry export ARCH --weights DEFAULT|none` (torchvision's COCO detectors).

The graph is the detector's inference form (`ferry.models.detectors.InferenceDetector`): a letterboxed
batch in (dynamic batch, fixed size), `boxes`, `scores`, `labels` out, the post-processing inside
(score threshold, per-class NMS as ONNX NonMaxSuppression, the best K). It is checked like a
classifier (onnx.checker, strict shape inference) and then against PyTorch on the same inputs,
both fed by the runtime's own preprocessing:

- the same detections: every detection scoring at least MATCH_MIN_SCORE in one has one in the other
  with the same label, its box within BOX_ATOL input pixels and its score within SCORE_ATOL (seeded
  random inputs, and the checkpoint's validation images);
- the same mAP: the ONNX model's COCO mAP (faster-coco-eval) on the validation images within
  MAP_TOLERANCE_PP points of the checkpoint's, for mAP@[.5:.95] and mAP@0.5.

fp16 and int8 variants pass the same mAP gate against the checkpoint, or the export fails and writes
nothing (their detections are compared with fp32 and reported). The files are written as a set, as
for classifiers (pipeline.py).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.core.fileio import sha256_file
from ferry.core.machine import cpu_info
from ferry.export import onnx_export as ox
from ferry.runtime import contract
from ferry.runtime.contract import DerivedFrom, ModelMetadata, variant_filename
from ferry.runtime.presets import Preprocess

OUTPUT_NAMES = ("boxes", "scores", "labels")
BOX_ATOL = 0.5  # input pixels: a box of the ONNX model and of PyTorch may differ this much per coordinate
SCORE_ATOL = 1e-3
MATCH_MIN_SCORE = 0.3  # detections scoring at least this must be found by both (lower ones may flip at NMS ties)
MAP_TOLERANCE_PP = 0.5  # the ONNX model's mAP within this many points of the checkpoint's
CALIBRATION_IMAGES = 200


class DetectionMismatch(ox.ValidationError):
    """The exported detector does not find what PyTorch finds."""


class MapMismatch(ox.ValidationError):
    """The exported detector's mAP is not the checkpoint's."""


# --- ferry::nms_mask in ONNX --------------------------------------------------------------------------


def nms_mask_onnx(boxes, scores, iou_threshold: float, score_threshold: float, max_per_class: int):
    """`ferry::nms_mask` as ONNX: NonMaxSuppression gives the (batch, class, box) indices of the
    survivors; ScatterND writes 1.0 there into zeros of the scores' shape."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                    op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[score_threshold]))
    zeros = op.ConstantOfShape(op.Shape(scores))
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    return op.ScatterND(zeros, selected, ones)


def export_detector_onnx(module, example: np.ndarray, path: Path, *, opset: int) -> None:
    """torch.onnx.export (dynamo) of an InferenceDetector with a dynamic batch, input `input` and
    outputs boxes, scores, labels; ferry::nms_mask translated by `nms_mask_onnx`."""
    import torch

    module = module.eval()
    try:
        program = torch.onnx.export(
            module, (torch.from_numpy(example),), dynamo=True, opset_version=opset, input_names=[ox.INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
            custom_translation_table={torch.ops.ferry.nms_mask.default: nms_mask_onnx}, verbose=False)
        program.save(str(path))
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ox.ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    ox.check_written_opset(path, opset)


# --- what is exported -----------------------------------------------------------------------------------


@dataclass
class LoadedDetector:
    name: str
    arch: str
    module: Any  # InferenceDetector
    categories: list[tuple[int, str]]
    spec: Preprocess
    post: Any  # detectors.PostProcess
    weights: str
    untrained: bool = False
    val: Any = None  # a CocoSet: the images every check runs on (None: seeded random inputs only)
    calibration: list[Path] = field(default_factory=list)  # training images for int8
    extra: dict[str, Any] = field(default_factory=dict)  # "source" in the metadata


def load_detector(opts, log: Callable[[str], None]) -> LoadedDetector:
    import torch

    from ferry.models import checkpoint, detectors
    from ferry.runtime import coco

    detectors.check_arch(opts.model)
    if opts.checkpoint:
        state = checkpoint.load_detector_state(opts.checkpoint)
        if state["arch"] != opts.model:
            raise FerryError(f"{opts.checkpoint} holds a {state['arch']} detector, not {opts.model}: run `ferry export "
                             f"{state['arch']} --checkpoint {opts.checkpoint} ...`")
        _, module = checkpoint.detector_from_state(state, opts.checkpoint)
        cats = [coco.Category(c["id"], c["name"]) for c in state["categories"]]
        data = state["data"]
        annotations = opts.annotations or data["val_annotations"]
        images = opts.data_dir or (data["val_root"] if not opts.annotations else data["root"])
        val = coco.load_coco(images, annotations, categories=cats, progress=log)
        if not opts.annotations and Path(annotations) == Path(data["annotations"]):
            val = val.subset(data["val_ids"])  # the held-out share of the training JSON
        calibration = []
        if opts.int8:
            if not (Path(data["root"]).is_dir() and Path(data["annotations"]).is_file()):
                raise FerryError(f"--int8 calibrates on the training images {opts.checkpoint} was trained on "
                                 f"({data['annotations']}, images in {data['root']}), which are not on this machine; "
                                 "export int8 where they are, or without --int8")
            train = coco.load_coco(data["root"], data["annotations"], categories=cats, check_files=False)
            held = set(data["val_ids"]) if Path(data["annotations"]) == Path(data["val_annotations"]) else set()
            calibration = [train.path(im) for im in train.images if im.id not in held][:CALIBRATION_IMAGES]
        cfg = state["config"]
        return LoadedDetector(
            name=opts.name or state["arch"], arch=state["arch"], module=module, categories=[(c.id, c.name) for c in cats],
            spec=Preprocess.from_dict(state["preprocess"]), post=module.post,
            weights=f"checkpoint {Path(opts.checkpoint).name} (epoch {state['epoch']}, sha256 "
                    f"{sha256_file(opts.checkpoint)[:16]}), from {state.get('weights_source', '?')}",
            val=val, calibration=calibration,
            extra={"arch": state["arch"], "train_config": cfg, "small": state.get("small"),
                   "data": {"annotations": data["annotations"], "val_annotations": data["val_annotations"]}})
    # a torchvision detector as published: COCO's categories, pretrained weights or none
    import torchvision.models as tvm

    from ferry.runtime.presets import letterbox_spec

    if opts.model == detectors.DEFAULT_ARCH:
        raise FerryError(f"{opts.model} needs --checkpoint (the checkpoint.pt of `ferry train --task detect`); it has no "
                         "published weights")
    w = detectors.resolve_weights(opts.model, opts.weights)
    meta_cats = list((w.enum or tvm.get_model_weights(opts.model).DEFAULT).meta["categories"])
    categories = [(i, name) for i, name in enumerate(meta_cats) if i > 0]
    spec = letterbox_spec(size=detectors.default_image_size(opts.model), upscale=True)
    torch.manual_seed(0)
    model, note = detectors.build(opts.model, len(categories), w, image_size=spec.size[0], mean=spec.mean, std=spec.std)
    post = detectors.PostProcess()
    module = detectors.InferenceDetector(model, opts.model, spec.size, post)
    if opts.annotations:  # COCO's own JSON lists 80 categories; torchvision's 90 classes keep "N/A" for the gaps
        val = coco.load_coco(opts.data_dir or ".", opts.annotations, progress=log)
        known = dict(categories)
        foreign = [c for c in val.categories if known.get(c.id) != c.name or c.name == "N/A"]
        if foreign:
            raise FerryError(f"{opts.annotations}: category {foreign[0].id} {foreign[0].name!r} is not one of {opts.model}'s "
                             "COCO categories (same id, same name)")
        # class i of the model is COCO id categories[i][0]: the set is evaluated with the model's whole list,
        # its boxes' classes renumbered from the JSON's order to the model's
        position = {cid: i for i, (cid, _) in enumerate(categories)}
        renumber = np.array([position[c.id] for c in val.categories], dtype=np.int64)
        images = [dataclasses.replace(im, classes=renumber[im.classes]) for im in val.images]
        val = dataclasses.replace(val, categories=tuple(coco.Category(i, name) for i, name in categories), images=images)
    else:
        val = None
    return LoadedDetector(opts.name or opts.model, opts.model, module, categories, spec, post, weights=note,
                          untrained=not w.pretrained, val=val, extra={"arch": opts.model, "num_categories": len(categories)})


# --- running both models ------------------------------------------------------------------------------


def _valid(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = labels >= 0
    return boxes[keep], scores[keep], labels[keep]


def compare_detections(ours: tuple[np.ndarray, ...], ref: tuple[np.ndarray, ...], *, box_atol: float = BOX_ATOL,
                       score_atol: float = SCORE_ATOL, min_score: float = MATCH_MIN_SCORE) -> dict[str, Any]:
    """Two models' padded outputs (boxes (N, K, 4), scores (N, K), labels (N, K)) on the same batch:
    each detection scoring at least `min_score` in one must be in the other (same label, box within
    `box_atol`, score within `score_atol`). Returns the counts, the largest differences and the
    first detection without a match."""
    checked = unmatched = 0
    worst_box = worst_score = 0.0
    first = ""
    for i in range(len(ours[0])):
        a, b = _valid(*(t[i] for t in ours)), _valid(*(t[i] for t in ref))
        for (boxes, scores, labels), (o_boxes, o_scores, o_labels), side in ((a, b, "ONNX"), (b, a, "PyTorch")):
            for box, score, label in zip(boxes, scores, labels):
                if score < min_score:
                    continue
                checked += 1
                same = o_labels == label
                diff = np.abs(o_boxes[same] - box).max(axis=1) if same.any() else np.array([np.inf])
                j = int(np.argmin(diff))
                s_diff = abs(float(o_scores[same][j]) - float(score)) if same.any() else np.inf
                if diff[j] <= box_atol and s_diff <= score_atol:
                    worst_box, worst_score = max(worst_box, float(diff[j])), max(worst_score, s_diff)
                else:
                    unmatched += 1
                    if not first:
                        first = (f"image {i}: {side}'s label {int(label)} score {float(score):.3f} box "
                                 f"{np.round(box, 1).tolist()} has no match (nearest differs by {float(diff[j]):.3g} px)")
    return {"detections_checked": checked, "unmatched": unmatched, "max_box_diff_px": worst_box,
            "max_score_diff": worst_score, "first_unmatched": first}


def _merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    if not total:
        return dict(part)
    return {"detections_checked": total["detections_checked"] + part["detections_checked"],
            "unmatched": total["unmatched"] + part["unmatched"],
            "max_box_diff_px": max(total["max_box_diff_px"], part["max_box_diff_px"]),
            "max_score_diff": max(total["max_score_diff"], part["max_score_diff"]),
            "first_unmatched": total["first_unmatched"] or part["first_unmatched"]}


def _session_outputs(session, x: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(session.run(list(OUTPUT_NAMES), {ox.INPUT_NAME: x}))


def _torch_outputs(module, x: np.ndarray) -> tuple[np.ndarray, ...]:
    import torch

    with torch.inference_mode():
        return tuple(t.numpy() for t in module(torch.from_numpy(x)))


def on_dataset(val, spec: Preprocess, runs: dict[str, Callable[[np.ndarray], tuple[np.ndarray, ...]]], *,
               batch_size: int = 8) -> dict[str, dict[int, Any]]:
    """Each named model's outputs on every image of `val`, as image id -> ImageDetections in the
    image's pixels; every model is fed the same letterboxed batches (the runtime's preprocessing).
    Also returns the raw outputs per model under "_raw" (for comparisons)."""
    from ferry.runtime.coco import ImageDetections
    from ferry.runtime.images import load_image
    from ferry.runtime.presets import preprocess_letterbox

    found: dict[str, dict[int, Any]] = {name: {} for name in runs}
    raw: dict[str, list[tuple[np.ndarray, ...]]] = {name: [] for name in runs}
    images = list(val.images)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        arrays, frames = zip(*(preprocess_letterbox(load_image(val.path(im)), spec) for im in chunk))
        x = np.stack(arrays)
        for name, run in runs.items():
            boxes, scores, labels = run(x)
            raw[name].append((boxes, scores, labels))
            for im, frame, b, s, lab in zip(chunk, frames, boxes, scores, labels):
                keep = lab >= 0
                found[name][im.id] = ImageDetections(frame.to_original(b[keep]), s[keep], lab[keep])
    found["_raw"] = raw  # type: ignore[assignment]
    return found


def _compare_raw(raw_a: list, raw_b: list) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for a, b in zip(raw_a, raw_b):
        total = _merge(total, compare_detections(a, b))
    return total


def _maps(result: dict[str, Any]) -> dict[str, Any]:
    return {"map": result["map"], "map50": result["map50"], "map75": result["map75"], "detections": result["detections"]}


# --- the export -------------------------------------------------------------------------------------


def export_detector(opts, *, log: Callable[[str], None] = print):
    """Export, validate and write `<name>.onnx` (and --fp16 / --int8 variants) as one set (see the
    module docstring); returns an ExportResult."""
    import torch

    from ferry.export.pipeline import ExportResult, _check_out, _commit, _ferry_version, _staging
    from ferry.runtime import coco

    if opts.calib_dir:
        raise FerryError("--calib-dir is for classifiers; a detector's int8 is calibrated on its training images")
    if opts.atol is not None:  # likewise
        raise FerryError(f"--atol is for classifiers; a detector's boxes are checked against PyTorch's within "
                         f"{BOX_ATOL} px")
    if opts.int8_max_drop_pp is not None:  # it was ignored: the user would believe their gate held
        raise FerryError(f"--int8-max-drop is for classifiers; a detector's int8 and fp16 files are gated at "
                         f"{MAP_TOLERANCE_PP} mAP points of the checkpoint's")
    ox.check_opset(opts.opset)
    out = _check_out(opts)
    loaded = load_detector(opts, log)
    if opts.int8 and not loaded.calibration:
        raise FerryError(f"{loaded.name} --int8 needs training images to calibrate on: export it from a checkpoint")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(f"cannot create output folder {out}: {exc.strerror}") from exc

    rng = np.random.default_rng(opts.seed)
    chw = loaded.spec.input_shape
    random_batches = [rng.standard_normal((n, *chw), dtype=np.float32) for n in (1, 2)]
    base = contract.new_detector_metadata(
        model=loaded.name, categories=loaded.categories, preprocess=loaded.spec,
        score_threshold=loaded.post.score_threshold, iou_threshold=loaded.post.iou_threshold,
        max_detections=loaded.post.max_detections, weights=loaded.weights, untrained=loaded.untrained,
        exported=_exported(opts, _ferry_version()), validated_on={**cpu_info(), "onnxruntime_threads": ox.validation_threads()},
        postprocess={**loaded.post.to_dict(), "nms": "per class, ONNX NonMaxSuppression inside the graph"},
        **({"source": loaded.extra} if loaded.extra else {}))
    result = ExportResult()
    with _staging(out) as stage:
        fp32 = stage / variant_filename(loaded.name, "fp32")
        log(f"exporting detector {loaded.name} ({loaded.weights}) to {out / fp32.name} (opset {opts.opset}, input "
            f"{chw[2]}x{chw[1]}, post-processing in the graph)")
        torch.manual_seed(0)
        export_detector_onnx(loaded.module, random_batches[0], fp32, opset=opts.opset)
        ox.check_model(fp32, name=fp32.name)
        session = ox.cpu_session(fp32)
        names = [o.name for o in session.get_outputs()]
        if names != list(OUTPUT_NAMES):
            raise ox.OutputNamesMismatch(f"ONNX outputs are {names}, expected {list(OUTPUT_NAMES)}")
        random_check: dict[str, Any] = {}
        for x in random_batches:
            random_check = _merge(random_check, compare_detections(_session_outputs(session, x), _torch_outputs(loaded.module, x)))
        _gate_detections(random_check, "seeded random inputs")
        validation: dict[str, Any] = {"onnx_checker": "full_check passed",
                                      "random_inputs": {"batch_sizes": [len(x) for x in random_batches], **random_check},
                                      "tolerances": {"box_px": BOX_ATOL, "score": SCORE_ATOL, "min_score": MATCH_MIN_SCORE,
                                                     "map_pp": MAP_TOLERANCE_PP}}
        reference = None
        if loaded.val is not None:
            log(f"  checking on {len(loaded.val.images)} validation images against PyTorch ...")
            found = on_dataset(loaded.val, loaded.spec, {"torch": lambda x: _torch_outputs(loaded.module, x),
                                                         "onnx": lambda x: _session_outputs(session, x)})
            agreement = _compare_raw(found["_raw"]["onnx"], found["_raw"]["torch"])
            _gate_detections(agreement, f"{len(loaded.val.images)} validation images")
            reference = coco.evaluate(loaded.val, found["torch"])
            ours = coco.evaluate(loaded.val, found["onnx"])
            _gate_map(ours, reference, "fp32")
            validation["held_out"] = {"dataset": f"{loaded.val.annotations.name} ({len(loaded.val.images)} images, "
                                                 f"{loaded.val.boxes()} boxes)",
                                      "agreement_with_pytorch": agreement, "pytorch": _maps(reference), "onnx": _maps(ours)}
            log(f"  fp32 ok: {agreement['detections_checked']} detections as PyTorch's (boxes within "
                f"{agreement['max_box_diff_px']:.2g} px); mAP {ours['map']:.4f} (PyTorch {reference['map']:.4f}), "
                f"mAP@0.5 {ours['map50']:.4f} (PyTorch {reference['map50']:.4f})")
        elif random_check["detections_checked"]:
            log(f"  fp32 ok: {random_check['detections_checked']} detections on random inputs as PyTorch's")
        else:
            log(f"  fp32 ok: onnx.checker passed; nothing to compare with PyTorch (no detection scores above "
                f"{MATCH_MIN_SCORE} on random inputs{', as expected of random weights' if loaded.untrained else ''})")
        meta = base.replace(info={**base.info, "validation": validation})
        contract.write(fp32, meta)
        result.metadata["fp32"] = meta
        derived = DerivedFrom(fp32.name, sha256_file(fp32))
        for precision, wanted in (("fp16", opts.fp16), ("int8", opts.int8)):
            if wanted:
                target = stage / variant_filename(loaded.name, precision)
                result.metadata[precision] = _variant(precision, fp32, target, base, loaded, derived, reference, log)
        _commit(stage, out, loaded.name, list(result.metadata), log)
    result.paths = {p: out / variant_filename(loaded.name, p) for p in result.metadata}
    return result


def _gate_detections(agreement: dict[str, Any], where: str) -> None:
    if agreement["unmatched"]:
        raise DetectionMismatch(f"on {where}, {agreement['unmatched']} of {agreement['detections_checked']} detections "
                                f"differ from PyTorch's: {agreement['first_unmatched']}")


def _gate_map(ours: dict[str, Any], reference: dict[str, Any], what: str) -> None:
    for key, label in (("map", "mAP@[.5:.95]"), ("map50", "mAP@0.5")):
        drop = 100 * abs((reference[key] or 0) - (ours[key] or 0))
        if drop > MAP_TOLERANCE_PP:
            hint = "" if what == "fp32" else f"; export without --{what}"
            raise MapMismatch(f"{what} {label} {ours[key]:.4f} differs from the checkpoint's {reference[key]:.4f} by "
                              f"{drop:.2f} points (allowed {MAP_TOLERANCE_PP}){hint}")


def _variant(precision: str, fp32: Path, target: Path, base: ModelMetadata, loaded: LoadedDetector, derived: DerivedFrom,
             reference: dict[str, Any] | None, log: Callable[[str], None]) -> ModelMetadata:
    from ferry.runtime import coco

    if precision == "fp16":
        log("converting to fp16 (float32 inputs and outputs; NMS, TopK and RoiAlign stay float32)")
        _fp16(fp32, target)
    else:
        log(f"quantizing to int8 (static QDQ, convolutions, calibrated on {len(loaded.calibration)} training images)")
        _int8(fp32, target, loaded)
    ox.check_model(target, name=target.name)
    variant, reference_session = ox.cpu_session(target), ox.cpu_session(fp32)
    info: dict[str, Any] = {}
    if loaded.val is not None:
        found = on_dataset(loaded.val, loaded.spec, {"variant": lambda x: _session_outputs(variant, x),
                                                     "fp32": lambda x: _session_outputs(reference_session, x)})
        ours = coco.evaluate(loaded.val, found["variant"])
        info = {"dataset": f"{loaded.val.annotations.name} ({len(loaded.val.images)} images)",
                "agreement_with_fp32": _compare_raw(found["_raw"]["variant"], found["_raw"]["fp32"]), "map": _maps(ours),
                "checkpoint_map": _maps(reference)}
        _gate_map(ours, reference, precision)
        log(f"  {precision} ok: mAP {ours['map']:.4f}, mAP@0.5 {ours['map50']:.4f} (checkpoint {reference['map']:.4f}, "
            f"{reference['map50']:.4f}; gate {MAP_TOLERANCE_PP} points)")
    else:
        x = np.random.default_rng(1).standard_normal((2, *loaded.spec.input_shape), dtype=np.float32)
        info = {"dataset": "2 seeded random inputs (no validation images: not gated)",
                "agreement_with_fp32": compare_detections(_session_outputs(variant, x), _session_outputs(reference_session, x))}
        log(f"  {precision} written (no validation images: its mAP is not checked)")
    extra = {"intended_provider": "CUDAExecutionProvider", "io_dtype": "float32"} if precision == "fp16" else \
        {"quantization": {"format": "QDQ", "ops": "Conv, Gemm, MatMul", "calibration_images": len(loaded.calibration),
                          "reduce_range": True}}
    meta = base.replace(precision=precision, derived_from=derived, info={**base.info, **extra, "accuracy_vs_fp32": info})
    contract.write(target, meta)
    return meta


def _fp16(fp32: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ferry.export.variants import _topological_sort

    try:
        proto = onnx.load(str(fp32))
        del proto.graph.value_info[:]  # the exporter's float32 annotations of inner tensors; the converter infers its own
        proto = convert_float_to_float16(proto, keep_io_types=True, node_block_list=_postprocessing_nodes(proto.graph))
        _drop_round_trips(proto.graph)
        _topological_sort(proto.graph)
        onnx.save(proto, str(target))
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ox.ExportError(f"fp16 conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def _postprocessing_nodes(graph) -> list[str]:
    """The names of the nodes from the first TopK (the candidates' selection) on: the post-processing,
    which stays float32 in the fp16 file (scores, boxes and indices compared in full precision)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    start = next((n for n in graph.node if n.op_type == "TopK"), None)
    if start is None:
        return []
    blocked, todo = {start.name}, [start]
    while todo:
        node = todo.pop()
        for out in node.output:
            for nxt in consumers.get(out, []):
                if nxt.name not in blocked:
                    blocked.add(nxt.name)
                    todo.append(nxt)
    blocked |= {n.name for n in graph.node if n.op_type in ("ConstantOfShape", "NonMaxSuppression")}
    return sorted(blocked)


def _drop_round_trips(graph) -> None:
    """Remove the float32 -> float16 -> float32 Cast pairs the converter puts between two float32
    (blocked) nodes: they would round the post-processing's values (indices among them) to fp16."""
    from onnx import TensorProto

    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    dropped: set[int] = set()
    for node in list(graph.node):
        if cast_to(node) != TensorProto.FLOAT16 or node.output[0] in graph_outputs:
            continue
        src = producers.get(node.input[0])
        if src is not None and cast_to(src) == TensorProto.FLOAT16:
            continue
        users = consumers.get(node.output[0], [])
        if not users or not all(cast_to(u) == TensorProto.FLOAT for u in users):
            continue
        original = node.input[0]
        named = [u.output[0] for u in users if u.output[0] in graph_outputs]
        if len(named) > 1:
            continue
        if named:  # a graph output: the fp32 original takes its name
            _rename(graph, original, named[0])
            original = named[0]
        for up in users:  # each fp32 cast after it: its readers read the fp32 original instead
            for reader in consumers.get(up.output[0], []):
                reader.input[:] = [original if i == up.output[0] else i for i in reader.input]
            dropped.add(id(up))
        dropped.add(id(node))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


def _rename(graph, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]


def _int8(fp32: Path, target: Path, loaded: LoadedDetector) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ferry.export.variants import _Reader
    from ferry.runtime.inputs import read_images
    from ferry.runtime.presets import preprocess_letterbox

    arrays, _, skipped = read_images(loaded.calibration, lambda img: preprocess_letterbox(img, loaded.spec)[0])
    if not arrays:
        raise FerryError("no readable calibration images")
    pre = target.with_name(target.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(target), _Reader(np.stack(arrays), batch_size=8), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    except FerryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ox.ExportError(f"int8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        pre.unlink(missing_ok=True)


def _exported(opts, ferry_version: str) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "opset": opts.opset,
            "exporter": "torch.onnx.export(dynamo=True), ferry::nms_mask -> NonMaxSuppression", "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "ferry": ferry_version}
