"""The model contract: what a ferry model file is, owned by this one module.

A ferry model is an ONNX file whose `metadata_props["ferry"]` holds one JSON object, described by
`ModelMetadata` (format `FORMAT_VERSION`). This module owns

- the file names of a model set: `<model>.onnx` (fp32) and its variants `<model>.int8.onnx`,
  `<model>.fp16.onnx` (`variant_filename`, `variant_path`), and their coherence (a variant records
  the sha256 of the fp32 file it was made from: `check_coherent`);
- the schema: typed dataclasses, checked field by field when read *and* when written, so an export
  can never write a file the runtime would refuse;
- reading it from a file without onnx or a session (the protobuf wire format, graph skipped:
  `read`), or from a loaded session (`parse`);
- writing it into a file without onnx (the same wire format: `write`), for `ferry export`.

Every room that touches a model file calls it: export writes, the runtime, `ferry bench`, `serve`,
`batch` and `draw` read. A problem is a `MetadataError`: one line naming the file and the field.
Models written by earlier ferry versions (format 1, `"schema": 1`) still load.

Two tasks share the format: `classify` (one output, `logits`) and `detect` (three outputs, `boxes`
(batch, K, 4) x1, y1, x2, y2 in input pixels, `scores` (batch, K) and `labels` (batch, K) int64,
padded: label -1 and score 0 where there is no detection; a `letterbox` preprocessing; and a
`detection` object: the categories with their COCO ids, the score threshold, the NMS IoU threshold
and K). A detector file is format 2 too: a ferry that predates detectors refuses it in one line (its
outputs are not a classifier's), and every classifier file reads as before.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ferry.core.errors import FerryError
from ferry.core.fileio import atomic_path, check_input_file, sha256_file
from ferry.runtime.presets import Preprocess, SpecError

METADATA_KEY = "ferry"  # metadata_props key of the JSON object
NAME_KEY = "ferry.model"  # a plain copy of the model's name, for tools that list metadata_props
FORMAT_VERSION = 2
OLDEST_FORMAT = 1  # format 1: ferry 0.1 ("schema": 1); read and upgraded on the fly
PRECISIONS = ("fp32", "int8", "fp16")  # the files of a model set
TASKS = ("classify", "detect")
OUTPUT_KINDS = ("logits", "boxes", "scores", "labels")
DETECT_OUTPUTS = (("boxes", "float32"), ("scores", "float32"), ("labels", "int64"))  # kind and dtype, in graph order
DTYPES = ("float32", "int64")
MIN_FERRY = "0.2"  # what to re-export with, for files this version cannot read


class MetadataError(FerryError):
    """A model file whose ferry metadata is missing, malformed, foreign or too new."""


class IncoherentModelSet(FerryError):
    """A variant whose fp32 sibling has been replaced since the variant was made from it."""


# --- file names ------------------------------------------------------------------------------


def variant_filename(model: str, precision: str) -> str:
    """`resnet50` + `int8` -> `resnet50.int8.onnx`; fp32 is the plain `resnet50.onnx`."""
    if precision not in PRECISIONS:
        raise FerryError(f"unknown precision {precision!r}; a model set has {', '.join(PRECISIONS)}")
    return f"{model}.onnx" if precision == "fp32" else f"{model}.{precision}.onnx"


def variant_path(models_dir: str | Path, model: str, precision: str) -> Path:
    return Path(models_dir) / variant_filename(model, precision)


# --- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (`"batch"` for the dynamic first dimension), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    kind: str = ""  # outputs: "logits"; a detector's "boxes", "scores", "labels"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.kind:
            d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class DetectionSpec:
    """What a detector's outputs mean: its categories (class index i is categories[i], with its COCO
    id), and the post-processing inside its graph."""

    categories: tuple[tuple[int, str], ...]  # (COCO id, name), in class-index order
    score_threshold: float  # detections scoring at most this were dropped in the graph
    iou_threshold: float  # per-class NMS
    max_detections: int  # K: the outputs' second dimension
    box_format: str = "xyxy"  # x1, y1, x2, y2
    box_units: str = "input pixels"  # the letterboxed input's; the runtime maps them to the image's

    def to_dict(self) -> dict[str, Any]:
        return {"categories": [{"id": i, "name": n} for i, n in self.categories], "score_threshold": self.score_threshold,
                "iou_threshold": self.iou_threshold, "max_detections": self.max_detections,
                "box_format": self.box_format, "box_units": self.box_units}


@dataclass(frozen=True)
class DerivedFrom:
    """A variant's origin: the fp32 file's name and sha256 when the variant was made."""

    file: str
    sha256: str


# Informational fields: written by export, shown by tools, never needed to run the model. Each
# must be a JSON object (or a string where noted); unknown extra fields are kept as they are.
INFO_OBJECTS = ("validation", "validated_on", "exported", "source", "quantization", "accuracy_vs_fp32",
                "precision_checks")
INFO_STRINGS = ("intended_provider", "io_dtype")


@dataclass(frozen=True)
class ModelMetadata:
    """The JSON under `metadata_props["ferry"]` (docs: "Architecture" > "The model contract").

    What the runtime needs is typed; provenance and validation results live in `info` (JSON objects,
    written flat beside the typed fields)."""

    model: str  # the model's name: mnist-cnn, resnet50, an architecture or --name
    labels: tuple[str, ...]  # class names in output order, as shown to people
    preprocess: Preprocess
    input: TensorSpec
    output: TensorSpec
    precision: str = "fp32"  # fp32 | int8 | fp16
    task: str = "classify"
    weights: str = ""  # where the weights came from (checkpoint and sha256, a weights name, a file, none)
    untrained: bool = False  # random weights: predictions are meaningless
    derived_from: DerivedFrom | None = None  # variants: the fp32 file they were made from
    original_labels: tuple[str, ...] | None = None  # the source's own names when `labels` replaced them
    labels_source: str = ""  # where `labels` come from when they replaced the originals
    detection: DetectionSpec | None = None  # task detect: the categories and post-processing
    outputs: tuple[TensorSpec, ...] = ()  # every output in graph order (a detector's three); () means (output,)
    format_version: int = FORMAT_VERSION
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one prepared input."""
        return self.preprocess.input_shape

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def all_outputs(self) -> tuple[TensorSpec, ...]:
        return self.outputs or (self.output,)

    def replace(self, **changes: Any) -> ModelMetadata:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": self.format_version,
            "model": self.model,
            "task": self.task,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "precision": self.precision,
            "weights": self.weights,
            "untrained": self.untrained,
        }
        if self.derived_from is not None:
            d["derived_from"] = {"file": self.derived_from.file, "sha256": self.derived_from.sha256}
        if self.original_labels is not None:
            d["original_labels"] = list(self.original_labels)
        if self.labels_source:
            d["labels_source"] = self.labels_source
        if self.detection is not None:
            d["detection"] = self.detection.to_dict()
        if self.outputs:
            d["outputs"] = [o.to_dict() for o in self.outputs]
        return {**dict(self.info), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def new_metadata(*, model: str, labels: list[str], preprocess: Preprocess, **kwargs: Any) -> ModelMetadata:
    """The metadata of a freshly exported classifier: input `input` (batch, C, H, W) float32 and
    output `logits` (batch, classes), checked like a file's. `kwargs`: the other typed fields,
    plus informational objects (validation, exported, source, ...) that go into `info`."""
    input_name, output_name = kwargs.pop("input_name", "input"), kwargs.pop("output_name", "logits")
    typed = {f.name for f in dataclasses.fields(ModelMetadata)}
    info = {k: kwargs.pop(k) for k in list(kwargs) if k not in typed}
    meta = ModelMetadata(
        model=model, labels=tuple(labels), preprocess=preprocess,
        input=TensorSpec(input_name, ("batch", *preprocess.input_shape)),
        output=TensorSpec(output_name, ("batch", len(labels)), kind="logits"),
        info={**dict(kwargs.pop("info", {})), **info}, **kwargs)
    return validate(meta.to_dict(), "the exported model")


def new_detector_metadata(*, model: str, categories: list[tuple[int, str]], preprocess: Preprocess, score_threshold: float,
                          iou_threshold: float, max_detections: int, **kwargs: Any) -> ModelMetadata:
    """The metadata of a freshly exported detector: input `input` (batch, 3, H, W) float32 and outputs
    `boxes`, `scores`, `labels` (DETECT_OUTPUTS), checked like a file's. `kwargs` as for `new_metadata`."""
    typed = {f.name for f in dataclasses.fields(ModelMetadata)}
    info = {k: kwargs.pop(k) for k in list(kwargs) if k not in typed}
    k = max_detections
    outputs = (TensorSpec("boxes", ("batch", k, 4), "float32", "boxes"), TensorSpec("scores", ("batch", k), "float32", "scores"),
               TensorSpec("labels", ("batch", k), "int64", "labels"))
    meta = ModelMetadata(
        model=model, labels=tuple(n for _, n in categories), preprocess=preprocess, task="detect",
        input=TensorSpec("input", ("batch", *preprocess.input_shape)), output=outputs[0], outputs=outputs,
        detection=DetectionSpec(tuple((int(i), str(n)) for i, n in categories), float(score_threshold), float(iou_threshold),
                                int(max_detections)),
        info={**dict(kwargs.pop("info", {})), **info}, **kwargs)
    return validate(meta.to_dict(), "the exported model")


# --- validation --------------------------------------------------------------------------------


class _Fields:
    """Typed access to a JSON object; every problem names the file and the field."""

    def __init__(self, data: Mapping[str, Any], where: str, prefix: str = "") -> None:
        self.data, self.where, self.prefix = data, where, prefix

    def fail(self, key: str, problem: str) -> MetadataError:
        return MetadataError(f"{self.where}: metadata field {self.prefix + key!r} {problem}")

    def get(self, key: str, kinds: type | tuple[type, ...], *, default: Any = ..., what: str = "") -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "is missing")
            return default
        value = self.data[key]
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _as_tuple(kinds))
        if not ok:
            raise self.fail(key, f"must be {what or _kind_name(kinds)} (got {_show(value)})")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: Any = ...) -> str:
        value = self.get(key, str, default=default)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def strings(self, key: str, *, default: Any = ..., nonempty: bool = True) -> tuple[str, ...] | None:
        value = self.get(key, list, default=default, what="a list of strings")
        if value is None:
            return None
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None:
            raise self.fail(key, f"must be a list of strings (holds {_show(bad)})")
        if nonempty and not value:
            raise self.fail(key, "is empty")
        return tuple(value)

    def nested(self, key: str, *, default: Any = ...) -> _Fields | None:
        value = self.get(key, dict, default=default, what="an object")
        return None if value is None else _Fields(value, self.where, f"{self.prefix}{key}.")


def _as_tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_name(kinds) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kinds))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tensor(f: _Fields, key: str, *, output: bool) -> TensorSpec:
    return _tensor_of(f.nested(key), output=output)


def _tensor_of(t: _Fields, *, output: bool) -> TensorSpec:
    name = t.get("name", str)
    if not name:
        raise t.fail("name", "is empty")
    shape = t.get("shape", list, what="a list")
    if not shape or not all(d == "batch" or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape):
        raise t.fail("shape", f"must list positive sizes, the first may be \"batch\" (got {_show(shape)})")
    dtype = t.choice("dtype", DTYPES if output else ("float32",), default="float32")
    kind = t.choice("kind", OUTPUT_KINDS) if output else ""
    return TensorSpec(name, tuple(shape), dtype, kind)


def _detection(f: _Fields, labels: tuple[str, ...], out: TensorSpec) -> tuple[DetectionSpec, tuple[TensorSpec, ...]]:
    """A detector's `detection` object and `outputs` list, checked against its labels and each other."""
    d = f.nested("detection")
    raw = d.get("categories", list, what="a list of {id, name} objects")
    cats = []
    for i, c in enumerate(raw):
        ok = isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool) \
            and isinstance(c.get("name"), str) and c["name"]
        if not ok:
            raise d.fail("categories", f"item {i} must be an object with an integer id and a name (got {_show(c)})")
        cats.append((c["id"], c["name"]))
    if not cats:
        raise d.fail("categories", "is empty")
    if len({i for i, _ in cats}) != len(cats):
        raise d.fail("categories", "lists a category id twice")
    if tuple(n for _, n in cats) != labels:
        raise f.fail("labels", f"must be the names of detection.categories in order ({len(labels)} labels, {len(cats)} categories)")
    score = d.get("score_threshold", (int, float), what="a number")
    iou = d.get("iou_threshold", (int, float), what="a number")
    if not 0 <= score < 1:
        raise d.fail("score_threshold", f"must be in [0, 1) (got {score})")
    if not 0 < iou <= 1:
        raise d.fail("iou_threshold", f"must be in (0, 1] (got {iou})")
    k = d.get("max_detections", int)
    if k < 1:
        raise d.fail("max_detections", f"must be >= 1 (got {k})")
    d.choice("box_format", ("xyxy",), default="xyxy")
    d.choice("box_units", ("input pixels",), default="input pixels")
    items = f.get("outputs", list, what="a list of 3 tensors")
    if len(items) != len(DETECT_OUTPUTS) or not all(isinstance(t, dict) for t in items):
        raise f.fail("outputs", f"must list the {len(DETECT_OUTPUTS)} outputs boxes, scores, labels (got {_show(items)})")
    outputs = tuple(_tensor_of(_Fields(t, f.where, f"outputs[{i}]."), output=True) for i, t in enumerate(items))
    shapes = (("batch", k, 4), ("batch", k), ("batch", k))
    for i, (t, (kind, dtype), shape) in enumerate(zip(outputs, DETECT_OUTPUTS, shapes)):
        if t.kind != kind or t.dtype != dtype or t.shape != shape:
            raise f.fail(f"outputs[{i}]", f"must be the {kind} output, {dtype} of shape {_show(list(shape))} "
                                          f"(got {t.kind or 'no kind'}, {t.dtype}, {_show(list(t.shape))})")
    if out != outputs[0]:
        raise f.fail("output", "must be the first of 'outputs' (the boxes)")
    spec = DetectionSpec(tuple(cats), float(score), float(iou), k)
    return spec, outputs


def _version(raw: dict[str, Any], where: str) -> int:
    if "format_version" in raw:
        v = raw["format_version"]
        if not isinstance(v, int) or isinstance(v, bool):
            raise MetadataError(f"{where}: metadata field 'format_version' must be an integer (got {_show(v)})")
    elif raw.get("schema") == 1:  # ferry 0.1
        v = 1
    else:
        raise MetadataError(f"{where}: its ferry metadata has no format_version: not written by `ferry export` "
                            f"(or by a version before {MIN_FERRY}); re-export it with ferry >= {MIN_FERRY}")
    if v > FORMAT_VERSION:
        raise MetadataError(f"{where}: written by a newer ferry (model format {v}; this ferry reads formats "
                            f"{OLDEST_FORMAT} to {FORMAT_VERSION}): upgrade with `pip install -U ferry`")
    if v < OLDEST_FORMAT:
        raise MetadataError(f"{where}: model format {v} is too old; re-export it with ferry >= {MIN_FERRY}")
    return v


def validate(raw: Any, where: str | Path) -> ModelMetadata:
    """The typed metadata of a parsed JSON value, or a MetadataError naming `where` and the field."""
    where = str(where)
    if not isinstance(raw, dict):
        raise MetadataError(f"{where}: its ferry metadata is not a JSON object (got {type(raw).__name__})")
    version = _version(raw, where)
    f = _Fields(raw, where)
    labels = f.strings("labels")
    pre = f.nested("preprocess")
    try:
        preprocess = Preprocess.from_dict(pre.data)
    except SpecError as exc:
        raise pre.fail(exc.field, exc.problem) from None
    inp = _tensor(f, "input", output=False)
    out = _tensor(f, "output", output=True)
    if tuple(inp.shape[1:]) != preprocess.input_shape:
        raise f.fail("input.shape", f"{_show(list(inp.shape))} does not match the preprocessing's (batch, "
                                    f"{', '.join(map(str, preprocess.input_shape))})")
    task = f.choice("task", TASKS, default="classify")
    detection, outputs = None, ()
    if task == "detect":
        if preprocess.kind != "letterbox":
            raise pre.fail("kind", f"must be letterbox for a detector (got {preprocess.kind!r})")
        detection, outputs = _detection(f, labels, out)
    else:
        if preprocess.kind == "letterbox":
            raise pre.fail("kind", "letterbox is a detector's preprocessing; a classifier's is mnist or imagenet")
        if out.kind != "logits" or out.dtype != "float32":
            raise f.fail("output.kind", f"must be logits (float32) for a classifier (got {out.kind}, {out.dtype})")
        for key in ("detection", "outputs"):
            if key in raw:
                raise f.fail(key, f"belongs to a detector, and this model's task is {task}")
        if out.shape[-1] != len(labels):
            raise f.fail("labels", f"lists {len(labels)} names but the output has {out.shape[-1]} classes")
    derived = f.nested("derived_from", default=None)
    original = f.strings("original_labels", default=None)
    if original is not None and len(original) != len(labels):
        raise f.fail("original_labels", f"lists {len(original)} names for {len(labels)} classes")
    for key in INFO_OBJECTS:
        f.get(key, dict, default=None, what="an object")
    for key in INFO_STRINGS:
        f.get(key, str, default=None)
    typed = {"format_version", "schema", "model", "task", "labels", "preprocess", "input", "output", "precision",
             "weights", "untrained", "derived_from", "original_labels", "labels_source", "detection", "outputs"}
    model = f.get("model", str)
    if not model:
        raise f.fail("model", "is empty")
    return ModelMetadata(
        model=model,
        labels=labels,
        preprocess=preprocess,
        input=inp,
        output=out,
        precision=f.choice("precision", PRECISIONS, default="fp32"),
        task=task,
        weights=f.get("weights", str, default=""),
        untrained=f.get("untrained", bool, default=False),
        derived_from=DerivedFrom(derived.get("file", str), derived.get("sha256", str)) if derived else None,
        original_labels=original,
        labels_source=f.get("labels_source", str, default=""),
        detection=detection,
        outputs=outputs,
        format_version=FORMAT_VERSION if version < FORMAT_VERSION else version,
        info={k: v for k, v in raw.items() if k not in typed},
    )


def parse(text: str | None, where: str | Path) -> ModelMetadata:
    """The metadata from the JSON text stored under METADATA_KEY (None: the key is absent)."""
    if text is None:
        raise MetadataError(f"{where} has no ferry metadata: it was not written by `ferry export`")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{where}: its ferry metadata is not valid JSON ({exc.msg} at character {exc.pos})") from exc
    return validate(raw, where)


def read(path: str | Path) -> ModelMetadata:
    """The metadata of a model file, read without onnx and without loading the graph."""
    path = Path(path)
    check_model_file(path)
    return parse(read_props(path).get(METADATA_KEY), path)


def check_model_file(path: Path) -> None:
    """A model path names a file with something in it: a folder or an empty file is said as such."""
    check_input_file(path, "model", "model's .onnx file")


def from_session(session: Any, path: str | Path) -> ModelMetadata:
    """The metadata of a loaded onnxruntime (or compatible) session."""
    return parse(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)


def write(path: str | Path, meta: ModelMetadata) -> None:
    """Stamp `meta` (checked first) into the ONNX file at `path`, atomically; other metadata_props
    entries are kept, and the file names ferry as its producer."""
    checked = validate(meta.to_dict(), path)
    props = read_props(path)
    props[METADATA_KEY] = checked.to_json()
    props[NAME_KEY] = checked.model
    rewrite(path, props, producer="ferry",
            doc=f"ferry export of {checked.model}; metadata JSON under metadata_props['{METADATA_KEY}']")


# --- coherence of a model set --------------------------------------------------------------------


def fp32_sibling(path: str | Path, meta: ModelMetadata) -> Path:
    """Where a variant's fp32 model lives: <model>.onnx beside <model>.<precision>.onnx."""
    return Path(path).with_name(variant_filename(meta.model, "fp32"))


def batch_dims_fit(dims: list[Any], want: Sequence[int]) -> bool:
    """Whether a graph tensor's dimensions (ints, or names/None where dynamic) are (batch, *want):
    as many, and each fixed one after the batch equal to its `want`."""
    return len(dims) == len(want) + 1 and all(not isinstance(g, int) or g == w for g, w in zip(dims[1:], want))


def check_coherent(path: str | Path, meta: ModelMetadata) -> None:
    """A variant records the sha256 of the fp32 file it was made from. If that fp32 file is beside it
    and has changed since (a newer export), the variant is stale: refuse it. A variant deployed on
    its own (no sibling) is accepted."""
    if meta.precision == "fp32" or meta.derived_from is None:
        return
    sibling = fp32_sibling(path, meta)
    if not sibling.is_file():
        return
    if sha256_file(sibling) != meta.derived_from.sha256:
        raise IncoherentModelSet(
            f"{path} was made from another {sibling.name} (sha256 {meta.derived_from.sha256[:12]}...) than the one beside "
            f"it now: it is stale. Re-export with `ferry export ... --{meta.precision}` or remove it")


# --- the protobuf wire format (onnx.ModelProto), enough to read and replace metadata_props ----------

_PRODUCER_NAME, _DOC_STRING, _METADATA_PROPS = 2, 6, 14  # onnx.ModelProto field numbers


def _varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated protobuf")
            return None
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(f: BinaryIO) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start offset, end offset) of each top-level field, skipping values."""
    while True:
        start = f.tell()
        tag = _varint(f)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            n = _varint(f)
            if n is None:
                raise ValueError("truncated protobuf")
            f.seek(n, 1)
        else:
            raise ValueError(f"unexpected wire type {wire}")
        end = f.tell()
        yield number, wire, start, end


def _value(f: BinaryIO, start: int, end: int) -> bytes:
    """The payload of a length-delimited field spanning [start, end)."""
    f.seek(start)
    _varint(f)  # tag
    n = _varint(f)
    data = f.read(n)
    if len(data) != n or f.tell() != end:
        raise ValueError("truncated protobuf")
    return data


def _entry(buf: bytes) -> tuple[str, str]:
    """StringStringEntryProto: key = field 1, value = field 2."""
    f, out = io.BytesIO(buf), {1: b"", 2: b""}
    for number, wire, start, end in list(_fields(f)):
        if wire != 2:
            raise ValueError("unexpected wire type in a metadata entry")
        out[number] = _value(f, start, end)
    return out[1].decode("utf-8"), out[2].decode("utf-8")


def _string_field(number: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data


def read_props(path: str | Path) -> dict[str, str]:
    """All metadata_props of an ONNX file, without parsing its graph."""
    props: dict[str, str] = {}
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for number, wire, start, end in _fields(f):
                if end > size:
                    raise ValueError("truncated protobuf")
                if number == _METADATA_PROPS and wire == 2:
                    here = f.tell()
                    key, value = _entry(_value(f, start, end))
                    props[key] = value
                    f.seek(here)
    except OSError as exc:
        raise FerryError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path} is not a readable ONNX file ({exc})") from exc
    return props


def rewrite(path: str | Path, props: Mapping[str, str], *, producer: str | None = None, doc: str | None = None) -> None:
    """Replace the file's metadata_props with `props` (and its producer name and doc string when
    given), atomically, copying every other field byte for byte. No onnx needed."""
    path = Path(path)
    replaced = {_METADATA_PROPS} | ({_PRODUCER_NAME} if producer is not None else set()) | \
        ({_DOC_STRING} if doc is not None else set())
    try:
        size = path.stat().st_size
        with open(path, "rb") as src, atomic_path(path) as tmp, open(tmp, "wb") as dst:
            for number, _wire, start, end in list(_fields(src)):
                if end > size:
                    raise ValueError("truncated protobuf")
                if number in replaced:
                    continue
                src.seek(start)
                _copy(src, dst, end - start)
            if producer is not None:
                dst.write(_string_field(_PRODUCER_NAME, producer))
            if doc is not None:
                dst.write(_string_field(_DOC_STRING, doc))
            for key, value in props.items():
                entry = _string_field(1, key) + _string_field(2, value)
                dst.write(_encode_varint(_METADATA_PROPS << 3 | 2) + _encode_varint(len(entry)) + entry)
    except OSError as exc:
        raise FerryError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise MetadataError(f"{path} is not a readable ONNX file ({exc})") from exc


def _copy(src: BinaryIO, dst: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise ValueError("truncated protobuf")
        dst.write(chunk)
        n -= len(chunk)


__all__ = ["FORMAT_VERSION", "METADATA_KEY", "PRECISIONS", "DerivedFrom", "DetectionSpec", "IncoherentModelSet", "MetadataError",
           "ModelMetadata", "TensorSpec", "check_coherent", "fp32_sibling", "from_session", "new_detector_metadata",
           "new_metadata", "parse",
           "read", "read_props", "rewrite", "validate", "variant_filename", "variant_path", "write"]
