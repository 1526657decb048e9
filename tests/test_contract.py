"""The model contract (`ferry.runtime.contract`): one module names the files, owns the metadata
schema, writes it (export) and reads and checks it (runtime, bench, serve, batch, draw).

A corpus of hostile metadata goes through `ferry predict`, `ferry serve` (which must refuse to
start) and `ferry batch` (which must refuse before Ray starts): each case is one line naming the
file and the field, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ferry.core.errors import FerryError
from ferry.runtime import contract
from ferry.runtime.classifier import Classifier
from tests.conftest import assert_clean_error, run_ferry


def _good(cnn_export) -> dict:
    return contract.read(cnn_export[0]).to_dict()


def _set(path, value) -> None:
    """Replace the ferry metadata of `path` with `value` (a dict, a raw string, or None: no metadata)."""
    props = {} if value is None else {contract.METADATA_KEY: value if isinstance(value, str) else json.dumps(value)}
    contract.rewrite(path, props)


def _mutate(change):
    def make(meta: dict):
        meta = json.loads(json.dumps(meta))
        change(meta)
        return meta
    return make


# name -> (metadata: a function of the good metadata dict, what the one-line error must say)
HOSTILE = {
    "no metadata": (lambda m: None, "has no ferry metadata"),
    "not JSON": (lambda m: "{'labels': ", "not valid JSON"),
    "a JSON list": (lambda m: "[1, 2, 3]", "not a JSON object"),
    "foreign": (lambda m: {"labels": m["labels"], "author": "another tool"}, "no format_version"),
    "a newer format": (_mutate(lambda m: m.update(format_version=contract.FORMAT_VERSION + 1)), "written by a newer ferry"),
    "version as text": (_mutate(lambda m: m.update(format_version="2")), "'format_version' must be an integer"),
    "labels missing": (_mutate(lambda m: m.pop("labels")), "'labels' is missing"),
    "labels not strings": (_mutate(lambda m: m.update(labels=list(range(10)))), "'labels' must be a list of strings"),
    "labels vs output": (_mutate(lambda m: m.update(labels=m["labels"] + ["ten"])), "lists 11 names but the output has 10"),
    "preprocess empty": (_mutate(lambda m: m.update(preprocess={})), "'preprocess.kind' is missing"),
    "preprocess kind": (_mutate(lambda m: m["preprocess"].update(kind="audio")), "'preprocess.kind' must be one of"),
    "std of zero": (_mutate(lambda m: m["preprocess"].update(std=[0])), "'preprocess.std' must be positive"),
    "mean too long": (_mutate(lambda m: m["preprocess"].update(mean=[0.1, 0.2])), "'preprocess.mean' must be a list of 1"),
    "precision": (_mutate(lambda m: m.update(precision="int4")), "'precision' must be one of fp32, int8, fp16"),
    "input shape": (_mutate(lambda m: m["input"].update(shape=["batch", 3, 28, 28])), "'input.shape'"),
    "model name": (_mutate(lambda m: m.update(model=7)), "'model' must be a string"),
    "derived_from": (_mutate(lambda m: m.update(derived_from="mnist-cnn.onnx")), "'derived_from' must be an object"),
}


@pytest.fixture(scope="module")
def hostile_models(cnn_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = _good(cnn_export)
    paths = {}
    for i, (name, (make, _)) in enumerate(HOSTILE.items()):
        path = root / f"case{i:02d}.onnx"
        shutil.copy(cnn_export[0], path)
        _set(path, make(good))
        paths[name] = path
    digit = root / "digit.png"
    Image.fromarray(np.pad(np.full((16, 4), 255, np.uint8), 6)).save(digit)
    return paths, digit


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata_is_one_line_naming_the_file_and_field(case, hostile_models, tmp_path, capsys, monkeypatch):
    """Through the library and the three commands that load models, in process (fast): `ferry serve`
    refuses before its server starts, `ferry batch` before Ray starts, both with exit code 2."""
    import uvicorn

    import ferry.cluster
    from ferry.cli import main

    paths, digit = hostile_models
    path, needle = paths[case], HOSTILE[case][1]
    with pytest.raises(FerryError, match=needle.replace("(", r"\(")) as err:
        contract.read(path)
    assert str(path) in str(err.value)

    def must_not_start(*_a, **_k):
        raise AssertionError("started despite a broken model")

    monkeypatch.setattr(uvicorn, "run", must_not_start)
    monkeypatch.setattr(ferry.cluster, "start_ray", must_not_start)
    for argv in (["predict", str(path), str(digit)],
                 ["serve", str(path), "--port", "0"],
                 ["batch", str(path), str(digit), "--out", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err_lines) == 1 and needle in err_lines[0] and str(path) in err_lines[0], (argv, err_lines)
    assert not (tmp_path / "out").exists()


def test_hostile_metadata_through_the_real_commands(hostile_models, tmp_path):
    """The same, as a user runs the commands (separate processes): no traceback, exit code 2."""
    paths, digit = hostile_models
    path = paths["preprocess empty"]
    assert_clean_error(run_ferry("predict", str(path), str(digit)), "'preprocess.kind' is missing", str(path))
    assert_clean_error(run_ferry("serve", str(path), "--port", "0"), "'preprocess.kind' is missing")
    assert_clean_error(run_ferry("batch", str(path), str(digit), "--out", str(tmp_path / "o")), "'preprocess.kind' is missing")


def test_labels_that_do_not_match_the_graphs_output(cnn_export, tmp_path):
    """Metadata that agrees with itself (11 labels, 11 outputs declared) but not with the graph (10)."""
    path = tmp_path / "eleven.onnx"
    shutil.copy(cnn_export[0], path)
    meta = _good(cnn_export)
    meta["labels"].append("ten")
    meta["output"]["shape"] = ["batch", 11]
    _set(path, meta)
    contract.read(path)  # consistent on paper
    with pytest.raises(FerryError, match="has 10 outputs but its metadata lists 11 labels"):
        Classifier.from_onnx(path, provider="cpu")


def test_a_model_written_by_ferry_0_1_still_loads(cnn_export, tmp_path):
    """Format 1 ("schema": 1, no format_version, no task) is read and upgraded: same predictions."""
    old = _good(cnn_export)
    for key in ("format_version", "task", "original_labels", "labels_source"):
        old.pop(key, None)
    old["schema"] = 1
    path = tmp_path / "old.onnx"
    shutil.copy(cnn_export[0], path)
    _set(path, old)
    meta = contract.read(path)
    assert meta.format_version == contract.FORMAT_VERSION and meta.task == "classify" and meta.labels == tuple("0123456789")
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
    new_clf, old_clf = Classifier.from_onnx(cnn_export[0], provider="cpu"), Classifier.from_onnx(path, provider="cpu")
    np.testing.assert_array_equal(old_clf.run(x), new_clf.run(x))


def test_write_checks_first_keeps_the_graph_and_other_properties(cnn_export, tmp_path):
    import onnx
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    shutil.copy(cnn_export[0], path)
    props = contract.read_props(path)
    props["author"] = "someone"
    contract.rewrite(path, props)
    meta = contract.read(path)
    contract.write(path, meta.replace(weights="re-stamped"))
    assert contract.read(path).weights == "re-stamped" and contract.read_props(path)["author"] == "someone"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.producer_name == "ferry"
    before = path.read_bytes()
    with pytest.raises(FerryError, match="'labels' lists 3 names but the output has 10"):
        contract.write(path, meta.replace(labels=("a", "b", "c")))
    assert path.read_bytes() == before  # nothing written
    x = np.zeros((2, 1, 28, 28), np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for p in (path, cnn_export[0])]
    np.testing.assert_array_equal(*run)


def test_file_names_of_a_model_set(tmp_path):
    assert contract.variant_filename("resnet50", "fp32") == "resnet50.onnx"
    assert contract.variant_path(tmp_path, "resnet50", "int8") == tmp_path / "resnet50.int8.onnx"
    with pytest.raises(FerryError, match="unknown precision 'int4'"):
        contract.variant_filename("resnet50", "int4")


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\xff")  # a length that runs past the end of the file
    with pytest.raises(FerryError, match="is not a readable ONNX file"):
        contract.read(path)
    with pytest.raises(FerryError, match="model not found"):
        contract.read(tmp_path / "missing.onnx")


def test_an_export_writes_the_schema_and_nothing_stray(cnn_export):
    """Every top-level key of an exported model's metadata is a field of the schema or one of its
    known informational objects (a stray key is a contract the readers do not know)."""
    import dataclasses

    raw = json.loads(contract.read_props(cnn_export[0])[contract.METADATA_KEY])
    typed = {f.name for f in dataclasses.fields(contract.ModelMetadata)} - {"info"}
    known = typed | set(contract.INFO_OBJECTS) | set(contract.INFO_STRINGS)
    assert set(raw) <= known, set(raw) - known
    assert raw["format_version"] == contract.FORMAT_VERSION and raw["task"] == "classify"
    assert {"validation", "validated_on", "exported", "precision_checks"} <= set(raw)


# --- detectors ------------------------------------------------------------------------------------

# name -> (metadata: a function of a good detector's metadata dict, what the one-line error must say)
DETECTOR_HOSTILE = {
    "no detection object": (_mutate(lambda m: m.pop("detection")), "'detection' is missing"),
    "labels are not the categories": (_mutate(lambda m: m["detection"]["categories"][0].update(name="zero")),
                                      "'labels' must be the names of detection.categories"),
    "a category id twice": (_mutate(lambda m: m["detection"]["categories"][1].update(id=1)), "lists a category id twice"),
    "a category without an id": (_mutate(lambda m: m["detection"]["categories"][2].pop("id")),
                                 "'detection.categories' item 2 must be an object with an integer id"),
    "score threshold": (_mutate(lambda m: m["detection"].update(score_threshold=1.5)),
                        "'detection.score_threshold' must be in [0, 1)"),
    "no outputs": (_mutate(lambda m: m.pop("outputs")), "'outputs' is missing"),
    "outputs of another K": (_mutate(lambda m: m["detection"].update(max_detections=50)),
                             "'outputs[0]' must be the boxes output, float32 of shape"),
    "labels as floats": (_mutate(lambda m: m["outputs"][2].update(dtype="float32")),
                         "'outputs[2]' must be the labels output, int64"),
    "a classifier's preprocessing": (_mutate(lambda m: m.update(preprocess={**m["preprocess"], "kind": "imagenet",
                                                                            "resize": 96, "crop": [96, 96]})),
                                     "'preprocess.kind' must be letterbox for a detector"),
    "upscale not a boolean": (_mutate(lambda m: m["preprocess"].update(upscale="yes")),
                              "'preprocess.upscale' must be true or false"),
    "an unknown task": (_mutate(lambda m: m.update(task="segment")), "'task' must be one of classify, detect"),
}


@pytest.fixture(scope="module")
def hostile_detectors(detector_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_det")
    good = contract.read(detector_export["path"]).to_dict()
    paths = {}
    for i, (name, (make, _)) in enumerate(DETECTOR_HOSTILE.items()):
        path = root / f"det{i:02d}.onnx"
        shutil.copy(detector_export["path"], path)
        _set(path, make(good))
        paths[name] = path
    return paths, detector_export["scenes"] / "val" / "000000.png"


@pytest.mark.parametrize("case", list(DETECTOR_HOSTILE))
def test_hostile_detector_metadata_is_one_line(case, hostile_detectors, tmp_path, capsys, monkeypatch):
    """A detector's metadata is checked like a classifier's: the library and the commands that load
    models (predict, serve before its server starts, batch before Ray starts) give one line naming
    the file and the field, exit code 2."""
    import uvicorn

    import ferry.cluster
    from ferry.cli import main

    paths, scene = hostile_detectors
    path, needle = paths[case], DETECTOR_HOSTILE[case][1]
    with pytest.raises(FerryError) as err:
        contract.read(path)
    assert needle in str(err.value) and str(path) in str(err.value), str(err.value)

    def must_not_start(*_a, **_k):
        raise AssertionError("started despite a broken model")

    monkeypatch.setattr(uvicorn, "run", must_not_start)
    monkeypatch.setattr(ferry.cluster, "start_ray", must_not_start)
    for argv in (["predict", str(path), str(scene)], ["serve", str(path), "--port", "0"],
                 ["batch", str(path), str(scene), "--out", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err_lines) == 1 and needle in err_lines[0] and str(path) in err_lines[0], (argv, err_lines)
    assert not (tmp_path / "out").exists()


def test_a_classifier_cannot_claim_a_detectors_parts(cnn_export, tmp_path):
    good = _good(cnn_export)
    for change, needle in ((lambda m: m.update(detection={"categories": []}), "'detection' belongs to a detector"),
                           (lambda m: m["output"].update(kind="boxes"), "'output.kind' must be logits"),
                           (lambda m: m.update(preprocess={"kind": "letterbox", "size": [28, 28], "upscale": False,
                                                           "interpolation": "bilinear", "mean": [0.1], "std": [0.3]}),
                            "'preprocess.")):
        path = tmp_path / "c.onnx"
        shutil.copy(cnn_export[0], path)
        _set(path, _mutate(change)(good))
        with pytest.raises(FerryError, match=needle.replace("(", r"\(")):
            contract.read(path)


def test_a_detector_file_round_trips_through_the_contract(detector_export, tmp_path):
    meta = contract.read(detector_export["path"])
    again = contract.validate(json.loads(meta.to_json()), "again")
    assert again == meta.replace(info=again.info) and again.detection == meta.detection and again.outputs == meta.outputs
    path = tmp_path / "d.onnx"
    shutil.copy(detector_export["path"], path)
    contract.write(path, meta.replace(weights="re-stamped"))
    assert contract.read(path).weights == "re-stamped" and contract.read(path).task == "detect"
