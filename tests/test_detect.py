"""Object detection end to end, with tiny models and scenes: the COCO loader (odd cases and broken
JSONs), digit scenes, `ferry train --task detect` (resume, offline weights), the export checked
against PyTorch, the torch-free Detector, `ferry predict` / `serve` / `batch` on a detector with
hostile input, the canvas's number reading, and torchvision's four named detectors at tiny sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.core.errors import FerryError
from ferry.runtime import coco
from tests.conftest import BAD_IMAGES, REPO, assert_clean_error, run_ferry, write_bad_images
from tests.test_draw import xvfb  # noqa: F401 - the fixture of the GUI test below

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript'):
            raise ImportError(name + ' is blocked in this process')
sys.meta_path.insert(0, Block())
"""


# --- the COCO loader ------------------------------------------------------------------------------

def _coco_folder(tmp_path: Path) -> tuple[Path, dict]:
    """Three images and a JSON with the odd cases: an image without boxes, a crowd region, and
    category ids with a gap (1, 2, 5)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (w, h) in {"a.png": (40, 30), "b.png": (32, 32), "c.png": (50, 40)}.items():
        Image.new("RGB", (w, h), (200, 200, 200)).save(folder / name)
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 7, "file_name": "b.png", "width": 32, "height": 32},
                   {"id": 3, "file_name": "c.png", "width": 50, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 5, 15, 20.5], "area": 307.5, "iscrowd": 0},
                        {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 25, 40], "area": 1000, "iscrowd": 1},
                        {"id": 4, "image_id": 3, "category_id": 2, "bbox": [30, 10, 15, 15], "area": 225}],
        "categories": [{"id": 5, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    return folder, doc


def test_coco_loader_odd_cases(tmp_path):
    folder, _ = _coco_folder(tmp_path)
    data = coco.load_coco(folder, tmp_path / "instances.json")
    assert [(c.id, c.name) for c in data.categories] == [(1, "cat"), (2, "dog"), (5, "bird")]  # id order, gap kept
    by_id = {im.id: im for im in data.images}
    assert set(by_id) == {1, 3, 7} and len(by_id[7].boxes) == 0  # the image without boxes is kept
    np.testing.assert_allclose(by_id[1].boxes, [[2, 3, 12, 15], [20, 5, 35, 25.5]])  # xywh -> x1y1x2y2
    assert by_id[1].classes.tolist() == [0, 2]  # category 5 is class 2
    assert by_id[3].crowd.tolist() == [True, False]
    crowd_sliver = json.loads((tmp_path / "instances.json").read_text())  # a crowd region past an edge: dropped
    crowd_sliver["annotations"].append({"id": 5, "image_id": 1, "category_id": 1, "bbox": [40.2, 3, 0.5, 12], "iscrowd": 1})
    (tmp_path / "sliver.json").write_text(json.dumps(crowd_sliver))
    assert len(next(im for im in coco.load_coco(folder, tmp_path / "sliver.json").images if im.id == 1).boxes) == 2
    boxes, classes = by_id[3].targets()  # training leaves crowd regions out
    assert boxes.tolist() == [[30, 10, 45, 25]] and classes.tolist() == [1]
    gt = data.ground_truth()
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2, 5} and sum(a["iscrowd"] for a in gt["annotations"]) == 1

    # the evaluator: every real box found -> mAP 1; a detection on the crowd region is ignored, not a false positive
    found = {i: coco.ImageDetections(*im.targets()[:1], np.ones(len(im.targets()[0])), im.targets()[1])
             for i, im in by_id.items()}
    found = {i: coco.ImageDetections(d.boxes, np.ones(len(d.boxes)), d.scores.astype(int) * 0 + by_id[i].targets()[1])
             for i, d in found.items()}
    assert coco.evaluate(data, found)["map"] == pytest.approx(1.0)
    crowd_hit = dict(found)
    crowd_hit[3] = coco.ImageDetections(np.array([[30, 10, 45, 25], [0, 0, 25, 40]], float), np.array([1.0, 0.9]),
                                        np.array([1, 1]))
    assert coco.evaluate(data, crowd_hit)["map"] == pytest.approx(1.0)
    missed = dict(found)
    missed[1] = coco.ImageDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
    assert coco.evaluate(data, missed)["map"] < 0.9


def _break(doc: dict, change) -> dict:
    doc = json.loads(json.dumps(doc))
    change(doc)
    return doc


BROKEN = {
    "not JSON": (None, "is not valid JSON"),
    "no images list": (lambda d: d.pop("images"), "has no 'images' list"),
    "image file missing": (lambda d: d["images"].append({"id": 9, "file_name": "gone.png", "width": 8, "height": 8}),
                           "1 of its 4 images are missing"),
    "box outside the image": (lambda d: d["annotations"][0].update(bbox=[35, 3, 10, 12]), "lies outside its image a.png (40x30)"),
    "box past an edge within the slack": (lambda d: d["annotations"][0].update(bbox=[40.2, 3, 0.5, 12]),
                                          "lies outside its image a.png (40x30): nothing of it is inside"),
    "box above the top within the slack": (lambda d: d["annotations"][0].update(bbox=[2, -0.9, 10, 0.6]),
                                           "lies outside its image a.png (40x30): nothing of it is inside"),
    "unknown category id": (lambda d: d["annotations"][1].update(category_id=3), "category id 3, which 'categories' does not list"),
    "unknown image id": (lambda d: d["annotations"][1].update(image_id=99), "refers to image id 99"),
    "box without area": (lambda d: d["annotations"][1].update(bbox=[1, 1, 0, 5]), "has no area"),
    "wrong image size": (lambda d: d["images"][0].update(width=41), "size 40x30 but the JSON says 41x30"),
    "image id twice": (lambda d: d["images"][1].update(id=1), "image id 1 is listed twice"),
}


def test_broken_coco_json_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from ferry.cli import main

    folder, doc = _coco_folder(tmp_path)
    for i, (name, (change, needle)) in enumerate(BROKEN.items()):
        path = tmp_path / f"broken{i}.json"
        path.write_text("{'images': [" if change is None else json.dumps(_break(doc, change)))
        with pytest.raises(coco.CocoError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            coco.load_coco(folder, path)
        out = tmp_path / f"run{i}"
        code = main(["train", "--task", "detect", "--data-dir", str(folder), "--annotations", str(path), "--out", str(out)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and str(path) in lines[0], (name, lines)
        assert not out.exists(), name


def test_a_validation_json_must_have_the_training_categories(tmp_path):
    folder, doc = _coco_folder(tmp_path)
    other = _break(doc, lambda d: d["categories"][0].update(name="sparrow"))
    (tmp_path / "val.json").write_text(json.dumps(other))
    train = coco.load_coco(folder, tmp_path / "instances.json")
    with pytest.raises(coco.CocoError, match="are not the model's"):
        coco.load_coco(folder, tmp_path / "val.json", categories=train.categories)


# --- digit scenes ------------------------------------------------------------------------------------

def test_digit_scenes(tmp_path):
    from ferry.core.idx import synthetic_digits, write_mnist
    from ferry.train.scenes import SceneConfig, digit_pools, render_scene, write_split

    write_mnist(tmp_path / "mnist", synthetic_digits(240, seed=1), synthetic_digits(60, seed=2))
    pools = digit_pools(tmp_path / "mnist")
    test_x = pools["test"][0]
    assert len(pools["train"][0]) + len(pools["val"][0]) == 240 and len(test_x) == 60
    # the validation scenes' digits are the digit CNN's validation digits (`ferry train`'s fixed split), so
    # numbers written from them are held out from both models; on MNIST itself both hold out 5,000
    from ferry.core.idx import read_mnist
    from ferry.train.config import TrainConfig
    from ferry.train.data import split_indices
    from ferry.train.scenes import VAL_DIGITS

    train_x, _ = read_mnist(tmp_path / "mnist", "train")
    val_idx, _ = split_indices(240, len(pools["val"][0]))
    assert np.array_equal(pools["val"][0], train_x[np.sort(val_idx.numpy())]) and VAL_DIGITS == TrainConfig().val_size
    assert not {d.tobytes() for d in pools["val"][0]} & {d.tobytes() for d in pools["train"][0]}
    configs = [SceneConfig(rows=0.0), SceneConfig(pen_share=1.0, rows=0.0), SceneConfig(), SceneConfig(rows=1.0)]
    for seed, cfg in zip(range(12), configs * 3):  # scanned, pen-written, and rows of both
        img, placed = render_scene(np.random.default_rng(seed), test_x, pools["test"][1], cfg)
        assert 128 <= img.width <= 256 and 128 <= img.height <= 256 and 1 <= len(placed) <= 5 * cfg.max_digits  # rows of up to 5
        for p in placed:
            x1, y1, x2, y2 = p.box
            assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
            assert cfg.min_digit - 2 <= y2 - y1 <= cfg.max_digit + 2  # the ink's height, as drawn
        boxes = [p.box for p in placed]
        assert not any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                       for i, a in enumerate(boxes) for b in boxes[i + 1:])  # digits never overlap
    for seed in range(4):  # one placement, a row: 2-5 digits left to right, side by side at about one height
        img, placed = render_scene(np.random.default_rng(seed), test_x, pools["test"][1], SceneConfig(rows=1.0, max_digits=1))
        assert 2 <= len(placed) <= 5
        for a, b in zip(placed, placed[1:]):
            assert a.box[2] < b.box[0] and min(a.box[3], b.box[3]) > max(a.box[1], b.box[1])
    with pytest.raises(FerryError, match="pen_share"):
        SceneConfig(pen_share=1.5).check()
    with pytest.raises(FerryError, match="rows"):
        SceneConfig(rows=-0.1).check()
    path = write_split(tmp_path / "scenes", "test", *pools["test"], 5, seed=3)
    again = write_split(tmp_path / "again", "test", *pools["test"], 5, seed=3)
    assert json.loads(path.read_text())["annotations"] == json.loads(again.read_text())["annotations"]  # seeded
    # the demo's splits: rows in training scenes only; test scenes are those of a config without rows
    single = write_split(tmp_path / "single", "test", *pools["test"], 5, seed=3, cfg=SceneConfig(rows=0.0))
    rowed = write_split(tmp_path / "rowed", "test", *pools["test"], 5, seed=3, cfg=SceneConfig(rows=0.5))
    annotations = [json.loads(f.read_text())["annotations"] for f in (path, single, rowed)]
    assert annotations[0] == annotations[1] != annotations[2]
    train = write_split(tmp_path / "scenes", "train", *pools["train"], 2, seed=3)
    assert json.loads(train.read_text())["info"]["config"]["rows"] == 0.5
    data = coco.load_coco(tmp_path / "scenes" / "test", path)
    assert len(data.images) == 5 and [c.name for c in data.categories] == list("0123456789")
    assert [c.id for c in data.categories] == list(range(1, 11))


def test_pen_strokes_have_the_asked_height_pen_and_slant():
    import math

    from PIL import ImageDraw

    from ferry.train.strokes import pen_mask, skeleton_segments

    line = np.array([[[0.0, 10.0], [20.0, 10.0]]], np.float32)  # a vertical stroke, [[y0, x0], [y1, x1]]
    upright = pen_mask(line, height=40, pen=6)
    assert set(np.unique(upright)) == {0.0, 1.0}  # the canvas's hard edges
    rows, cols = np.flatnonzero(upright.max(1) > 0.25), np.flatnonzero(upright.max(0) > 0.25)
    assert abs(len(rows) - 40) <= 1 and abs(len(cols) - 6) <= 1  # ink height with the pen; the pen's width
    slanted = pen_mask(line, height=40, pen=6, shear=math.tan(math.radians(20)))
    top, bottom = (np.flatnonzero(slanted[r] > 0.5).mean() for r in (np.flatnonzero(slanted.max(1) > 0.5)[[3, -4]]))
    assert top - bottom == pytest.approx((40 - 6) * math.tan(math.radians(20)), abs=1.5)  # the top leans right
    soft = pen_mask(line, height=40, pen=6, supersample=3)
    assert ((soft > 0.05) & (soft < 0.95)).any()  # a scan's soft edges
    ring = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(ring).ellipse((7, 4, 21, 24), outline=255, width=3)  # a 0
    segs = skeleton_segments(np.asarray(ring))
    assert len(segs) > 10 and 0 <= segs.min() and segs.max() <= 28
    assert len(skeleton_segments(np.zeros((28, 28), np.uint8))) == 0
    assert pen_mask(np.zeros((0, 2, 2), np.float32), height=30, pen=4).max() == 0


# --- training and export ---------------------------------------------------------------------------

def test_training_writes_a_self_describing_checkpoint_and_resumes(detector_export, tmp_path):
    import dataclasses

    from ferry.models import checkpoint
    from ferry.train.detect import train_detector

    state = checkpoint.load_detector_state(detector_export["checkpoint"])
    assert state["arch"] == "fcos_small" and [c["name"] for c in state["categories"]] == list("0123456789")
    assert state["preprocess"]["kind"] == "letterbox" and state["epoch"] == 1
    assert state["data"]["val_ids"] == list(range(1, 9))
    run = Path(detector_export["config"].out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["epochs"][0]["val_map"] <= 1 and (run / "curves.png").stat().st_size > 1000
    # an interrupted two-epoch run, resumed: it continues after its last completed epoch
    cfg = dataclasses.replace(detector_export["config"], out=str(tmp_path / "run"), epochs=2)

    def stop_after_epoch_1(message: str) -> None:
        if message.startswith("epoch   1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_detector(cfg, progress=False, log=stop_after_epoch_1)
    first = checkpoint.load_detector_state(tmp_path / "run" / "checkpoint.pt")
    assert first["epoch"] == 1
    resumed = train_detector(cfg, resume=True, progress=False, log=lambda _m: None)
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == first["history"][0]  # the first epoch's record is the checkpoint's, not a rerun
    with pytest.raises(FerryError, match="different recipe"):
        train_detector(dataclasses.replace(cfg, lr=0.5), resume=True, progress=False, log=lambda _m: None)


def test_resume_refuses_a_held_out_split_that_moved(tmp_path):
    """The held-out split is recomputed from the images listed now; when the list changed since the
    checkpoint, most held-out images move (a resumed run would validate on images it trained on), so
    --resume refuses it in one line. The same list resumes."""
    from ferry.train.detect import load_data
    from ferry.train.detect_config import DetectConfig

    folder = tmp_path / "images"
    folder.mkdir()
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}]}
    for i in range(1, 21):
        Image.new("RGB", (32, 32), (200, 200, 200)).save(folder / f"{i}.png")
        doc["images"].append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        doc["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 10, 10]})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(doc))
    cfg = DetectConfig(data_dir=str(folder), annotations=str(ann), val_fraction=0.2)
    _, train_images, val, _ = load_data(cfg, saved=None, log=lambda _m: None)
    saved = {"categories": [{"id": 1, "name": "box"}], "data": {"val_ids": sorted(im.id for im in val.images)}}
    assert [im.id for im in load_data(cfg, saved=saved, log=lambda _m: None)[2].images] == [im.id for im in val.images]
    doc["images"] = doc["images"][:-1]  # one image less: the split moves
    doc["annotations"] = doc["annotations"][:-1]
    ann.write_text(json.dumps(doc))
    with pytest.raises(FerryError, match=r"--resume: the validation images differ from the checkpoint's \(\d+ image id"):
        load_data(cfg, saved=saved, log=lambda _m: None)


def test_export_matches_pytorch_and_states_its_tolerances(detector_export):
    from ferry.export.detect import BOX_ATOL, MAP_TOLERANCE_PP, compare_detections
    from ferry.runtime import contract

    meta = contract.read(detector_export["path"])
    assert meta.task == "detect" and meta.labels == tuple("0123456789") and meta.preprocess.kind == "letterbox"
    assert [o.name for o in meta.all_outputs] == ["boxes", "scores", "labels"] and meta.detection.max_detections == 100
    assert meta.detection.categories[0] == (1, "0")
    held = meta.info["validation"]["held_out"]
    assert held["agreement_with_pytorch"]["unmatched"] == 0
    assert abs(held["onnx"]["map"] - held["pytorch"]["map"]) * 100 <= MAP_TOLERANCE_PP
    assert meta.info["validation"]["tolerances"]["box_px"] == BOX_ATOL

    # what the check catches: a box moved by more than the tolerance, a label changed
    boxes = np.array([[[10, 10, 30, 40], [0, 0, 0, 0]]], np.float32)
    scores, labels = np.array([[0.9, 0.0]], np.float32), np.array([[3, -1]])
    same = compare_detections((boxes, scores, labels), (boxes + 0.1, scores, labels))
    assert same["unmatched"] == 0 and same["detections_checked"] == 2
    assert compare_detections((boxes, scores, labels), (boxes + [2, 0, 2, 0], scores, labels))["unmatched"] == 2
    assert compare_detections((boxes, scores, labels), (boxes, scores, np.array([[4, -1]])))["unmatched"] == 2

    from ferry.export.triton import config_pbtxt, validate_config

    text = config_pbtxt(meta, name="digits")  # Triton: the three outputs, labels as int64
    assert 'name: "labels" data_type: TYPE_INT64 dims: [ 100 ]' in text and 'name: "boxes" data_type: TYPE_FP32 dims: [ 100, 4 ]' in text
    parsed = validate_config(text)
    if parsed is None:
        pytest.skip("tritonclient is not installed: the config could not be parsed")
    assert [o.name for o in parsed.output] == ["boxes", "scores", "labels"]


def test_post_processing_pads_to_max_detections_when_the_network_has_fewer_pairs():
    """With fewer (anchor, class) pairs than max_detections (a tiny input, one category), the outputs
    still have max_detections rows, as the metadata and the Triton config say: padded with boxes 0,
    scores 0 and labels -1 after the real detections (they were cut to the pairs' count)."""
    import torch

    from ferry.models.detectors import PostProcess, postprocess

    torch.manual_seed(0)
    anchors, classes = 6, 2  # 12 pairs, max_detections 20
    xy = torch.rand(1, anchors, 2) * 20
    boxes = torch.cat([xy, xy + 5 + torch.rand(1, anchors, 2) * 5], dim=-1)
    scores = torch.rand(1, anchors, classes) * 0.8 + 0.1
    out_boxes, out_scores, labels = postprocess(boxes, scores, PostProcess(max_detections=20, iou_threshold=1.0), (32, 32))
    assert out_boxes.shape == (1, 20, 4) and out_scores.shape == (1, 20) and labels.shape == (1, 20)
    assert (labels[0, :12] >= 0).all() and (labels[0, 12:] == -1).all() and (out_scores[0, 12:] == 0).all()
    assert (out_boxes[0, 12:] == 0).all() and torch.equal(out_scores[0, :12], scores.reshape(-1).sort(descending=True).values)
    full = postprocess(boxes, scores, PostProcess(max_detections=12, iou_threshold=1.0), (32, 32))
    assert torch.equal(full[0][0], out_boxes[0, :12]) and torch.equal(full[2][0], labels[0, :12])


def test_weights_unavailable_offline_exit_3(monkeypatch, tmp_path, capsys):
    from torchvision.models._api import WeightsEnum

    from ferry.cli import main

    def offline(*_a, **_k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    folder, _ = _coco_folder(tmp_path)
    code = main(["train", "--task", "detect", "--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--data-dir", str(folder),
                 "--annotations", str(tmp_path / "instances.json"), "--val-annotations", str(tmp_path / "instances.json"),
                 "--out", str(tmp_path / "run"), "--image-size", "64"])
    err = capsys.readouterr().err
    assert code == 3 and "Offline?" in err, err
    assert code == 3 and "Offline?" in err and "--weights none" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "ssdlite320_mobilenet_v3_large", "--weights", "DEFAULT", "--out", str(tmp_path / "m")]) == 3
    assert "Offline?" in capsys.readouterr().err and not (tmp_path / "m" / "ssdlite320_mobilenet_v3_large.onnx").exists()
    assert main(["train", "--task", "detect", "--weights", "COCO_V1", "--data-dir", str(folder), "--annotations",
                 str(tmp_path / "instances.json"), "--out", str(tmp_path / "run")]) == 2  # fcos_small has none
    assert "has no pretrained weights" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("fasterrcnn_mobilenet_v3_large_fpn", 128), ("retinanet_resnet50_fpn_v2", 64),
                                        ("fcos_resnet50_fpn", 64), ("ssdlite320_mobilenet_v3_large", 128)])
def test_torchvision_detectors_train_and_run_at_tiny_sizes(arch, size):
    """Each named torchvision detector (random weights): a training step on letterboxed images (one
    of them without boxes) gives finite losses that move the weights, and its inference form (the
    one export writes) gives padded detections of the stated shapes."""
    import torch

    from ferry.models import detectors
    from ferry.models.tvmodels import Weights

    torch.manual_seed(0)
    model, _ = detectors.build(arch, 3, Weights("none"), image_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model.train()
    images = [torch.rand(3, size, size * 3 // 4), torch.rand(3, size // 2, size)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 25.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sum(losses.values()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, [p for p in model.parameters() if p.requires_grad]))
    # a threshold under the heads' prior (RetinaNet's 0.01): random weights still give detections to check
    module = detectors.InferenceDetector(model, arch, (size, size), detectors.PostProcess(score_threshold=0.001, max_detections=20))
    with torch.no_grad():
        boxes, scores, labels = module(torch.randn(2, 3, size, size))
    assert boxes.shape == (2, 20, 4) and scores.shape == (2, 20) and labels.shape == (2, 20) and labels.dtype == torch.int64
    valid = labels >= 0
    assert bool(valid.any()) and bool((scores[valid] > 0.001).all()) and bool((labels[valid] < 3).all()) and bool((scores[~valid] == 0).all())
    assert bool((boxes >= 0).all()) and bool((boxes <= size).all())


# --- the runtime, torch-free ------------------------------------------------------------------------

def test_drawings_never_go_where_they_could_replace_an_input(detector_export, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(detector_export["scenes"] / "val" / "000000.png", inputs / "x.png")
    before = (inputs / "x.png").read_bytes()
    proc = run_ferry("predict", str(detector_export["path"]), str(inputs), "--draw", str(inputs), "--provider", "cpu")
    assert_clean_error(proc, "--draw", "holds inputs")
    assert (inputs / "x.png").read_bytes() == before and "detection" not in proc.stdout
    # nor where a file of that name is already (an earlier run's drawing, a file of the user's)
    drawings = tmp_path / "drawings"
    drawings.mkdir()
    (drawings / "x.png").write_bytes(b"precious")
    proc = run_ferry("predict", str(detector_export["path"]), str(inputs), "--draw", str(drawings), "--provider", "cpu")
    assert_clean_error(proc, "--draw", "already holds 1 file(s) the drawings would be named (e.g. x.png)")
    assert (drawings / "x.png").read_bytes() == b"precious" and "detection" not in proc.stdout
    # an input given twice: two drawings, the second named apart
    proc = run_ferry("predict", str(detector_export["path"]), str(inputs / "x.png"), str(inputs / "x.png"), "--draw",
                     str(tmp_path / "twice"), "--provider", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == ["x-2.png", "x.png"]


def test_a_detector_whose_outputs_do_not_match_its_metadata_is_refused(detector_export, tmp_path):
    """Its metadata says K detections a row (and so does a Triton config made from it): a graph with
    another K (files exported before the post-processing padded to max_detections) is refused."""
    import onnx

    proto = onnx.load(str(detector_export["path"]))
    for prop in proto.metadata_props:
        if prop.key == "ferry":
            meta = json.loads(prop.value)
            meta["detection"]["max_detections"] = 50
            for out in meta["outputs"]:
                out["shape"][1] = 50
            meta["output"]["shape"][1] = 50
            prop.value = json.dumps(meta)
    odd = tmp_path / "odd.onnx"
    onnx.save(proto, str(odd))
    assert_clean_error(run_ferry("predict", str(odd), str(detector_export["scenes"] / "val" / "000000.png")),
                       "the graph's boxes output ['batch', 100, 4] does not match its metadata (batch, 50, 4); export it again")


def test_detector_runs_where_torch_cannot_be_imported_and_predict_draws(detector_export, tmp_path):
    """The Detector on a path, bytes and an array (the same detections), a folder with hostile files
    through detect_many, and `ferry predict --json --draw` (all in a process without torch)."""
    path = detector_export["path"]
    scenes = detector_export["scenes"] / "val"
    inputs = write_bad_images(tmp_path / "in")
    for name in ("000000.png", "000001.png"):
        shutil.copy(scenes / name, inputs / f"scene_{name}")
    code = BLOCK_TORCH + f"""
import json
import numpy as np
from PIL import Image
from ferry.runtime import Detector, open_model
det = Detector.from_onnx({str(path)!r}, provider='cpu')
assert open_model({str(path)!r}, provider='cpu').task == 'detect'
scene = {str(inputs / "scene_000000.png")!r}
a = det.detect(scene, min_score=0.0)
b = det.detect(open(scene, 'rb').read(), min_score=0.0)
c = det.detect(np.asarray(Image.open(scene).convert('RGB')), min_score=0.0)
assert a.to_dict() == b.to_dict() == c.to_dict() and len(a.detections) > 0
assert all(0 <= d.box[0] < d.box[2] <= a.width and 0 <= d.box[1] < d.box[3] <= a.height for d in a.detections)
outcomes = list(det.detect_many(sorted(str(p) for p in __import__('pathlib').Path({str(inputs)!r}).iterdir()), batch_size=3))
print(json.dumps({{o.source.rsplit('/', 1)[-1]: (o.ok, o.error) for o in outcomes}}))
from ferry.cli import main
code = main(['predict', {str(path)!r}, {str(inputs)!r}, '--json', {str(tmp_path / "out.json")!r}, '--draw',
             {str(tmp_path / "drawn")!r}, '--min-score', '0', '--provider', 'cpu'])
assert not any(m.split('.')[0] in ('torch', 'torchvision', 'onnx') for m in sys.modules)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr  # 1: some inputs failed, the rest ran
    assert "Traceback" not in proc.stderr and "6 of 10 inputs failed" in proc.stderr
    outcomes = json.loads(proc.stdout.splitlines()[0])
    assert outcomes["scene_000000.png"][0] and outcomes["a_good.png"][0]
    for name, needle in BAD_IMAGES.items():
        ok, error = outcomes[name]
        assert not ok and needle in error and name in error, (name, error)
    assert "scene_000000.png: " in proc.stdout and " detection(s) scoring >= 0" in proc.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["task"] == "detect" and doc["failed"] == 6 and len(doc["results"]) == 10
    scene = next(r for r in doc["results"] if r["source"].endswith("scene_000000.png"))
    assert scene["detections"] and set(scene["detections"][0]) == {"label", "category_id", "index", "score", "box"}
    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert drawn == ["a_good.png", "b_good_big.png", "scene_000000.png", "scene_000001.png"]
    original = np.asarray(Image.open(inputs / "scene_000000.png").convert("RGB"))
    picture = np.asarray(Image.open(tmp_path / "drawn" / "scene_000000.png"))
    assert picture.shape == original.shape and (picture != original).any(axis=-1).mean() > 0.01  # boxes were drawn


def test_predict_refuses_classifier_flags_and_a_detector_is_not_a_classifier(detector_export, cnn_export, tmp_path):
    from ferry.runtime.classifier import Classifier

    with pytest.raises(FerryError, match="is a detector .*not a classifier"):
        Classifier.from_onnx(detector_export["path"], provider="cpu")
    scene = detector_export["scenes"] / "val" / "000000.png"
    assert_clean_error(run_ferry("predict", str(cnn_export[0]), str(scene), "--draw", str(tmp_path / "d")), "are for detectors")
    assert_clean_error(run_ferry("draw", "--detector", str(cnn_export[0])), "not a detector")
    det = str(detector_export["path"])  # the number window's digit model: checked before a window opens
    assert_clean_error(run_ferry("draw", "--detector", det, "--model", str(tmp_path / "gone.onnx")), "no digit model at")
    assert_clean_error(run_ferry("draw", "--detector", det, "--model", det), "not a classifier")
    assert_clean_error(run_ferry("draw", "--model", "none"), "for the number window")


def test_number_window_digit_model_choice(tmp_path, monkeypatch, cnn_export):
    """`--model none`: the detector names the digits; no --model: the default file when it is there,
    else the detector; an explicit digit model is used."""
    from ferry.app.draw import _digit_namer

    monkeypatch.chdir(tmp_path)  # no models/mnist-cnn.onnx here
    assert _digit_namer("none", "cpu") is None and _digit_namer(None, "cpu") is None
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mnist-cnn.onnx").write_bytes(Path(cnn_export[0]).read_bytes())
    assert _digit_namer(None, "cpu").name == "mnist-cnn" and _digit_namer(str(cnn_export[0]), "cpu").name == "mnist-cnn"


# --- serve and batch -----------------------------------------------------------------------------------

def _http(method: str, url: str, body: bytes | None = None):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_a_detector(detector_export, cnn_export):
    """`ferry serve` with a detector and a classifier side by side (127.0.0.1, a handful of requests)."""
    import os
    import signal
    import time

    pytest.importorskip("uvicorn")
    from tests.conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", str(detector_export["path"]), str(cnn_export[0]),
                             "--port", str(port), "--provider", "cpu"], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if _http("GET", url + "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        scene_path = detector_export["scenes"] / "val" / "000001.png"
        scene = scene_path.read_bytes()
        status, body = _http("POST", url + "/v1/models/digits/predict?min_score=0", scene)
        assert status == 200 and body["model"] == "digits" and body["detections"], body
        assert (body["width"], body["height"]) == Image.open(scene_path).size and body["min_score"] == 0
        assert set(body["detections"][0]) == {"label", "category_id", "index", "score", "box"}
        status, fewer = _http("POST", url + "/v1/models/digits/predict", scene)  # the default: 0.5
        assert status == 200 and fewer["min_score"] == 0.5 and len(fewer["detections"]) <= len(body["detections"])
        for query, data, needle in (("?min_score=2", scene, "min_score must be a number from 0 to 1"),
                                    ("?min_score=nan", scene, "min_score must be"),
                                    ("", b"not an image", "not an image"), ("", b"", "empty body")):
            status, err = _http("POST", url + "/v1/models/digits/predict" + query, data)
            assert status == 400 and needle in err["error"] and "\n" not in err["error"], (query, err)
        status, listing = _http("GET", url + "/v1/models")
        digits = next(m for m in listing["models"] if m["name"] == "digits")
        assert digits["task"] == "detect" and digits["detection"]["categories"][3] == {"id": 4, "name": "3"}
        status, again = _http("POST", url + "/v1/models/digits/predict?min_score=0", scene)  # still serving, same answer
        assert status == 200 and again["detections"] == body["detections"]
        status, body = _http("POST", url + "/v1/models/mnist-cnn/predict", scene)  # the classifier beside it
        assert status == 200 and "label" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_batch_rows_of_a_detector(ray_local, detector_export, tmp_path):
    """`ferry batch` on a detector, on the session's Ray: one row per input with the detections that
    `Detector.detect_many` gives, a bad file and a missing one rows with their errors, the committed
    output one schema; another --min-score on the same --out is another job."""
    from ferry.batch.job import BatchOptions, read_results, run_batch
    from ferry.runtime import Detector

    folder = tmp_path / "in"
    folder.mkdir()
    scenes = [detector_export["scenes"] / "val" / n for n in ("000000.png", "000001.png", "000002.png")]
    for p in scenes:
        shutil.copy(p, folder / p.name)
    (folder / "notes.png").write_text("not an image")
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([*(str(folder / p.name) for p in scenes), str(folder / "notes.png"),
                                   str(folder / "gone.png")]) + "\n")
    summary = run_batch(BatchOptions(model=str(detector_export["path"]), input=str(listing), out=str(tmp_path / "out"),
                                     batch_size=2, min_score=0.0), log=lambda _m: None)
    table = read_results(str(tmp_path / "out"))
    assert table.schema.names == ["path", "detections", "count", "width", "height", "provider", "error"]
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert sorted(rows) == ["000000.png", "000001.png", "000002.png", "gone.png", "notes.png"]
    assert summary.images == 5 and summary.failures == 2
    assert "no such file" in rows["gone.png"]["error"] and rows["gone.png"]["count"] is None
    assert rows["notes.png"]["error"] and rows["notes.png"]["detections"] == []
    det = Detector.from_onnx(detector_export["path"], provider="cpu")
    for p in scenes:
        want = det.detect(p, min_score=0.0)
        row = rows[p.name]
        assert row["error"] is None and (row["width"], row["height"]) == (want.width, want.height)
        assert row["count"] == len(row["detections"]) == len(want.detections) > 0
        for got, exp in zip(row["detections"], want.detections):
            assert got["label"] == exp.label and got["box"] == pytest.approx(list(exp.box), abs=1e-2)
    with pytest.raises(FerryError, match="another --min-score"):
        run_batch(BatchOptions(model=str(detector_export["path"]), input=str(listing), out=str(tmp_path / "out"),
                               min_score=0.5, resume=True), log=lambda _m: None)


# --- the canvas reads a number ------------------------------------------------------------------------

class _Oracle:
    """A stand-in detector that 'finds' given digits at given places of the image it is shown (in
    score order, not left to right), to test the reading itself."""

    name = "oracle"
    labels = tuple("0123456789")
    category_ids = tuple(range(1, 11))

    def __init__(self, found):
        self.found = found
        self.calls = 0

    def detect(self, image, min_score=0.5):
        from ferry.runtime.detector import Detection, Detections

        self.calls += 1

        dets = tuple(Detection(box, label, int(label) + 1, int(label), score) for label, box, score in self.found
                     if score >= min_score)
        return Detections(tuple(sorted(dets, key=lambda d: -d.score)), image.width, image.height, "test", min_score)


def test_number_reading_is_left_to_right_one_digit_per_place():
    from ferry.app.canvas import NUMBER_INK_HEIGHT, NUMBER_MARGIN, Stroke, number_image, read_number
    from ferry.runtime.presets import EmptyImageError

    strokes = [Stroke([(100, 50), (100, 150)], width=10), Stroke([(300, 60), (340, 160)], width=10)]
    image, scale, left, top = number_image(strokes)
    assert image.height == round(NUMBER_INK_HEIGHT + 2 * NUMBER_MARGIN)
    ink = np.asarray(image) < 128
    rows = np.flatnonzero(ink.any(axis=1))
    assert abs((rows[-1] - rows[0] + 1) - NUMBER_INK_HEIGHT) <= 2  # the ink is scaled to the digits' trained height
    # "7" scores best but stands right; a weaker "1" over the same place as the "4" is dropped
    oracle = _Oracle([("7", (70, 12, 90, 52), 0.99), ("4", (10, 12, 30, 52), 0.9), ("1", (12, 12, 28, 52), 0.6),
                      ("2", (40, 12, 60, 52), 0.8)])
    reading = read_number(oracle, strokes)
    assert reading.text == "427"
    x1, y1, x2, y2 = reading.detections[0].box  # mapped back onto the canvas
    assert (x1, y1) == pytest.approx((10 / scale + left, 12 / scale + top))
    with pytest.raises(EmptyImageError, match="write a number"):
        read_number(oracle, [])


class _Namer:
    """A stand-in digit model: reads a tall, narrow drawing as "1" and any other as "8", and keeps
    what it was shown."""

    name = "namer"

    def __init__(self):
        self.shown = []

    def predict(self, image, top_k=1):
        from ferry.runtime.classifier import Candidate, Prediction

        ink = np.asarray(image) < 128
        self.shown.append(ink)
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        label = "1" if len(cols) * 3 < len(rows) else "8"
        return Prediction(int(label), label, 0.77, (Candidate(int(label), label, 0.77),), "test")


def test_number_read_by_detector_boxes_and_digit_model_names():
    """Two-stage reading: the detector's boxes, the digit model's labels and scores; the model sees
    each digit's own strokes only; a box with no stroke of its own keeps the detector's reading."""
    from ferry.app.canvas import Stroke, assign_strokes, number_image, read_number, strokes_in

    one = [Stroke([(100, 50), (100, 150)], width=10)]  # a "1"
    eight = [Stroke([(300, 60), (360, 60), (300, 160), (360, 160), (300, 60)], width=10)]  # a wide zigzag
    strokes = one + eight
    image, scale, left, top = number_image(strokes)

    def box(x1, y1, x2, y2):  # canvas -> the detector's image
        return ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)

    oracle = _Oracle([("4", box(90, 45, 110, 155), 0.9), ("7", box(295, 55, 365, 165), 0.8),
                      ("2", box(500, 45, 540, 155), 0.4),  # a third place with no ink at all, above READ_SCORE
                      ("6", box(580, 45, 620, 155), 0.25)])  # under it: not a digit
    namer = _Namer()
    reading = read_number(oracle, strokes, digits=namer)
    assert reading.text == "182" and [d.score for d in reading.detections] == pytest.approx([0.77, 0.77, 0.4])
    assert [(d.index, d.category_id) for d in reading.detections] == [(1, 2), (8, 9), (2, 3)]
    assert read_number(oracle, strokes).text == "472" == reading.by_detector  # the detector alone
    assert len(namer.shown) == 2
    widths = [len(np.flatnonzero(ink.any(0))) for ink in namer.shown]
    heights = [len(np.flatnonzero(ink.any(1))) for ink in namer.shown]
    assert widths[0] * 3 < heights[0] and heights[1] / 2 < widths[1] < heights[1]  # each image: its own digit only
    # a stroke belongs to the box holding most of its points (each box widened by a tenth of its
    # height), even where its centre is nearer a neighbour's; a tie goes to the nearer centre, then
    # the left; a stroke in no box belongs to none
    boxes = [(0, 0, 300, 100), (320, 0, 360, 100)]
    stray = Stroke([(280, 50), (290, 50), (295, 50), (330, 50), (340, 50)], width=10)  # 3 left, 2 right; centre right
    assert strokes_in([stray], boxes, 0) == [stray] and strokes_in([stray], boxes, 1) == []
    edge = Stroke([(60, 105), (60, 140)], width=10)  # just under the left box: within its tenth
    under = Stroke([(60, 160), (300, 160)], width=10)  # a line under the number
    assert strokes_in([edge, under], boxes, 0) == [edge] and strokes_in([edge, under], boxes, 1) == []
    assert assign_strokes([stray, under, edge], boxes) == [[stray, edge], []]  # one pass: each stroke once, in order
    assert strokes_in([stray], boxes, 2) == [] and strokes_in([stray], boxes, -1) == []  # no such box: no strokes
    tied = [(0, 0, 100, 100), (0, 0, 100, 100)]  # the same place twice: one of them, the first
    dot = Stroke([(50, 50), (52, 50)], width=10)
    assert strokes_in([dot], tied, 0) == [dot] and strokes_in([dot], tied, 1) == []


def test_the_ink_checks_the_detectors_places():
    """Pieces of ink are strokes whose inks touch (crossing lines with no point near each other
    included); a place holding two digit-sized pieces side by side is two places, a digit-sized piece
    in no place is a digit the detector missed, and a mark or a digit's touching strokes change nothing."""
    from ferry.app.canvas import Stroke, ink_pieces, number_image, places_from_ink, read_number

    cross = [Stroke([(0, 50), (200, 50)], width=4), Stroke([(100, 0), (100, 100)], width=4)]  # meet at (100, 50) only
    touching = Stroke([(0, 57), (50, 57)], width=8)  # 7 px under the first line: the inks touch
    apart = Stroke([(0, 70), (50, 70)], width=8)
    assert ink_pieces([*cross, touching, apart], reach=8) == [[0, 1, 2], [3]]
    assert ink_pieces([*cross, touching, apart], reach=30) == [[0, 1, 2, 3]]

    one = Stroke([(100, 50), (100, 150)], width=10)
    pair = [Stroke([(300, 50), (300, 150)], width=10), Stroke([(340, 50), (340, 150)], width=10)]  # two digits, one box
    missed = Stroke([(500, 50), (500, 150)], width=10)  # no box at all
    under = Stroke([(90, 175), (360, 175)], width=10)  # a line under the number: no box, not digit-sized
    strokes = [one, *pair, missed, under]
    boxes = [(90, 45, 110, 155), (290, 45, 350, 155)]
    assert places_from_ink(strokes, boxes) == [0, (295, 45, 305, 155), (335, 45, 345, 155), (495, 45, 505, 155)]
    mark = Stroke([(318, 100), (319, 100)], width=10)  # between the two, nearer the left: nothing of the ink is lost
    assert places_from_ink([one, *pair, mark], boxes) == [0, (295, 45, 324, 155), (335, 45, 345, 155)]
    four = [Stroke([(300, 50), (290, 110), (360, 110)], width=10), Stroke([(340, 60), (340, 150)], width=10)]  # they cross
    speck = Stroke([(330, 140), (331, 141)], width=10)  # a mark beside a digit: under half a digit tall
    assert places_from_ink([one, *four], boxes) == [0, 1]
    assert places_from_ink([one, pair[0], speck], boxes) == [0, 1]
    assert places_from_ink(strokes, []) == []  # no place to measure a digit by: nothing added

    image, scale, left, top = number_image(strokes)

    def box(x1, y1, x2, y2):  # canvas -> the detector's image
        return ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)

    oracle = _Oracle([("7", box(*boxes[0]), 0.9), ("4", box(*boxes[1]), 0.8)])
    namer = _Namer()
    reading = read_number(oracle, strokes, digits=namer)
    assert reading.text == "1111" and reading.by_detector == "74" and len(namer.shown) == 4
    assert [d.box for d in reading.detections][1:] == [pytest.approx(b) for b in
                                                       [(295, 45, 305, 155), (335, 45, 345, 155), (495, 45, 505, 155)]]
    assert [(d.score, d.index, d.category_id) for d in reading.detections][1:] == [(0.77, 1, 2)] * 3
    assert read_number(oracle, strokes).text == "74"  # the detector alone reads its own places


def test_a_mark_too_small_for_the_digit_model_keeps_the_detectors_reading(cnn_export):
    """A box whose only stroke is a tiny mark (its own page under the runtime's 8x8 minimum, which
    once failed the whole number): the number is still read, that place by the detector."""
    from ferry.app.canvas import Stroke, digit_image, number_image, read_number
    from ferry.runtime.classifier import Classifier
    from ferry.runtime.images import MIN_SIDE
    from ferry.runtime.presets import EmptyImageError

    one = [Stroke([(100, 50), (100, 150)], width=10)]
    speck = [Stroke([(300, 100), (302, 101)], width=2)]
    digits = Classifier.from_onnx(cnn_export[0], provider="cpu")
    with pytest.raises(EmptyImageError, match="too small"):
        digit_image(speck)
    assert min(digit_image([Stroke([(300, 100), (306, 103)], width=2)]).size) >= MIN_SIDE  # a little more is read
    strokes = one + speck
    image, scale, left, top = number_image(strokes)

    def box(x1, y1, x2, y2):
        return ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)

    oracle = _Oracle([("4", box(90, 45, 110, 155), 0.9), ("7", box(290, 90, 312, 111), 0.8)])
    reading = read_number(oracle, strokes, digits=digits)
    assert len(reading.text) == 2 and reading.text[1] == "7" and reading.detections[1].score == 0.8


def test_numbers_benchmark_small_version(detector_export):
    """The benchmark's own path on 3 numbers (the tiny model reads badly; the machinery is tested):
    four digits per number from consecutive test digits, each read through read_number."""
    from ferry.bench.canvas_numbers import measure_numbers, write_number
    from ferry.core.idx import synthetic_digits
    from ferry.runtime.detector import Detector
    from ferry.train.strokes import skeleton_segments

    images, labels = synthetic_digits(12, seed=5)
    strokes = write_number([skeleton_segments(d) for d in images[:4]], np.random.default_rng(0))
    xs = [np.mean([p[0] for p in s.points]) for s in strokes]
    assert min(xs) >= 0 and max(xs) <= 640 and all(s.width >= 1 for s in strokes)
    det = Detector.from_onnx(detector_export["path"], provider="cpu")
    result = measure_numbers(det, images, labels, numbers=3)
    assert result["numbers"] == 3 and 0 <= result["exact"] <= 1
    assert len(result["first_misses"]) == round(3 * (1 - result["exact"]))
    with pytest.raises(ValueError, match="need 16 digits"):
        measure_numbers(det, images, labels, numbers=4)
    # the two-stage reading, and the detector alone on the same drawings: one box over everything,
    # named "3" by the detector and (wide ink) "8" by the digit model
    namer, whole = _Namer(), _Oracle([("3", (0, 0, 10000, 10000), 0.9)])
    both = measure_numbers(whole, images, labels, numbers=3, digits=namer)
    assert both["reader"] == "oracle boxes, namer names" and len(namer.shown) == 3
    assert [m["read"] for m in both["first_misses"]] == ["8"] * 3 and both["wrong_length"] == 3
    assert [m["read"] for m in both["detector_alone"]["first_misses"]] == ["3"] * 3
    assert whole.calls == 3  # one detection per number serves both readers


def test_numbers_benchmark_reads_the_split_asked_for(detector_export, tmp_path, monkeypatch):
    """`--split val` writes the numbers from the training digits held out for validation (where readers
    are compared), the default from the test digits; the result says which."""
    import json

    import ferry.bench.canvas_fidelity as fidelity
    import ferry.core.idx as idx
    from ferry.bench import canvas_numbers
    from ferry.core.idx import synthetic_digits

    test_set, val_set = synthetic_digits(8, seed=1), synthetic_digits(8, seed=2)
    monkeypatch.setattr(idx, "read_mnist", lambda data_dir, kind: test_set if kind == "t10k" else pytest.fail(kind))
    monkeypatch.setattr(fidelity, "read_mnist_validation", lambda data_dir: val_set)
    seen, measure = [], canvas_numbers.measure_numbers
    monkeypatch.setattr(canvas_numbers, "measure_numbers",
                        lambda det, images, labels, **kw: seen.append(images) or measure(det, images, labels, **kw))
    for split, digits in (("val", val_set), ("test", test_set), (None, test_set)):
        out = tmp_path / f"{split}.json"
        argv = ["--model", str(detector_export["path"]), "--numbers", "2", "--out", str(out)] + (["--split", split] if split else [])
        assert canvas_numbers.main(argv) == 0
        assert seen[-1] is digits[0]
        result = json.loads(out.read_text())
        assert result["split"] == (split or "test") and result["numbers"] == 2
        assert result["writing"].startswith("4 held-out MNIST training digits" if split == "val" else "4 MNIST test digits")


@pytest.mark.gui
def test_number_window_under_xvfb(detector_export, cnn_export, tmp_path, request):
    """`ferry draw --detector`: the real window; two strokes written with the mouse are read when each
    ends (the tiny model's reading is not checked, the window's path is), and Escape clears it."""
    import os
    import time

    from tests.test_draw import _drag, _wait_for_lines, _xdo

    display = request.getfixturevalue("xvfb")
    log = tmp_path / "draw.log"
    with open(log, "w") as f:
        app = subprocess.Popen([sys.executable, "-m", "ferry", "draw", "--detector", str(detector_export["path"]),
                                "--model", str(cnn_export[0]), "--provider", "cpu"], cwd=REPO,
                               env={**os.environ, "DISPLAY": display, "PYTHONUNBUFFERED": "1"}, stdout=f, stderr=subprocess.STDOUT)
    try:
        wid = _xdo(display, "search", "--sync", "--name", "ferry draw: numbers").split()[0]
        geo = dict(line.split("=") for line in _xdo(display, "getwindowgeometry", "--shell", wid).split())
        ox, oy = int(geo["X"]) + 12, int(geo["Y"]) + 12
        _drag(display, [(ox + 100, oy + 60 + 8 * i) for i in range(13)])  # a "1"
        _drag(display, [(ox + 200 + 6 * i, oy + 60 + (0 if i < 6 else 12 * (i - 5))) for i in range(12)])  # a "7"
        lines = _wait_for_lines(log, 2)
        assert all("provider CPUExecutionProvider" in ln and "ms" in ln for ln in lines), lines
        assert "digits named by mnist-cnn (--model)" in log.read_text()
        _xdo(display, "mousemove", str(ox + 320), str(oy + 120))  # no window manager: keys go to the window under the pointer
        _xdo(display, "key", "Escape")  # Clear
        deadline = time.time() + 20
        while "write a number" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "write a number" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()
    finally:
        app.terminate()
        app.wait(timeout=10)


def test_letterbox_maps_boxes_back_to_a_larger_image():
    """An image twice the input's size is scaled down into the letterbox (top left, padded); a box
    found in the input maps back onto the original pixels (scaled up, not down), clipped to the image,
    and the padding holds the mean colour (0 once normalized)."""
    from ferry.runtime.presets import letterbox_spec, preprocess_letterbox

    spec = letterbox_spec(size=96, upscale=False)
    img = Image.new("RGB", (192, 120), (255, 255, 255))
    img.paste((0, 0, 0), (40, 20, 80, 60))  # a black square at x 40-80, y 20-60 of the original
    x, frame = preprocess_letterbox(img, spec)
    assert x.shape == (3, 96, 96) and (frame.width, frame.height) == (192, 120)
    assert frame.scale_x == pytest.approx(0.5) and frame.scale_y == pytest.approx(0.5)
    assert np.abs(x[:, 60:, :]).max() < 1e-6  # below the 60 rows of image: padding
    dark = np.argwhere(x[0, :60] < x[0, :60].max() - 1.0)  # the square's pixels in the input
    (y1, x1), (y2, x2) = dark.min(0), dark.max(0) + 1
    assert (x1, y1, x2, y2) == (20, 10, 40, 30)  # halved
    back = frame.to_original(np.array([[x1, y1, x2, y2], [90, 50, 200, 200]], np.float32))
    assert back[0].tolist() == pytest.approx([40, 20, 80, 60])
    assert back[1].tolist() == pytest.approx([180, 100, 192, 120])  # clipped to the original image
    small = Image.new("RGB", (48, 40), (255, 255, 255))  # a smaller image is not enlarged (upscale off)
    _, frame = preprocess_letterbox(small, spec)
    assert (frame.scale_x, frame.scale_y) == (1.0, 1.0)


def test_a_flat_drawing_stays_a_small_image():
    """A dash or a dot on the number canvas is not blown up to the digits' height (a 600 px dash once
    became an image ~24,000 px wide); a row of digits is still scaled to the trained ink height."""
    from ferry.app.canvas import NUMBER_INK_HEIGHT, Stroke, number_image

    image, scale, _, _ = number_image([Stroke([(20, 100), (620, 101)], width=8)])
    assert image.width <= 600 and scale <= 1.0
    image, _, _, _ = number_image([Stroke([(50, 50), (50, 50)], width=8)])
    assert image.width < 200 and image.height < 200
    image, scale, _, _ = number_image([Stroke([(100, 40), (100, 200)], width=10), Stroke([(200, 40), (260, 200)], width=10)])
    assert scale == pytest.approx(NUMBER_INK_HEIGHT / (160 * 1.14), rel=0.05)


def test_bench_checkpoints_per_model():
    """`ferry bench --checkpoint`: a bare path is the digit CNN's; MODEL=PATH names another model."""
    from ferry.bench.cli import checkpoints

    assert checkpoints(None) is None and checkpoints(["runs/c.pt"]) == "runs/c.pt"
    assert checkpoints(["runs/c.pt", "digits=runs/d.pt"]) == {"mnist-cnn": "runs/c.pt", "digits": "runs/d.pt"}
    assert checkpoints(["runs/lr=0.1/ck.pt"]) == "runs/lr=0.1/ck.pt"  # a path with "=" in it
    with pytest.raises(FerryError, match="MODEL=PATH"):
        checkpoints(["digits="])


def test_min_score_is_a_plain_decimal_for_detectors_only(cnn_export, tmp_path):
    """`?min_score=` takes plain decimals from 0 to 1, nothing float() would stretch to; `ferry batch
    --min-score` on a classifier is a one-line error before Ray starts."""
    from ferry.batch.job import BatchOptions, run_batch
    from ferry.serve.detect import parse_min_score

    assert parse_min_score([]) is None and parse_min_score(["0.5"]) == 0.5 and parse_min_score([".25"]) == 0.25
    assert parse_min_score(["1"]) == 1.0 and parse_min_score(["0"]) == 0.0
    for bad in (" 0.5", "5e-1", "+.5", "0_1", "1.5", "nan", "-0", "", "0.5x"):
        with pytest.raises(FerryError, match="min_score must be a number from 0 to 1"):
            parse_min_score([bad])
    with pytest.raises(FerryError, match="given once"):
        parse_min_score(["0.5", "0.6"])
    with pytest.raises(FerryError, match="--min-score applies to detectors"):
        run_batch(BatchOptions(model=str(cnn_export[0]), input=str(tmp_path), out=str(tmp_path / "out"), min_score=0.5),
                  log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_bench_times_a_detector_against_its_own_weights(detector_export):
    """`ferry bench` on a trained detector: the PyTorch row runs the checkpoint's weights (NMS's work
    depends on the scores), or is skipped with the reason, never timed on random weights."""
    from ferry.bench.suite import BenchConfig, run_benchmarks

    path = Path(detector_export["path"])
    base = dict(models_dir=str(path.parent), models=("digits",), backends=("torch-eager-cpu", "ort-cpu-fp32"),
                batch_sizes={"digits": (1,)}, min_seconds=0.01, min_calls=3, warmup=1, round_seconds=0.002,
                max_seconds_batch1=2, max_seconds_offline=1)
    results = run_benchmarks(BenchConfig(**base))
    assert {r["backend"] for r in results["rows"]} == {"ort-cpu-fp32"}
    assert any(s["backend"] == "torch-eager-cpu" and "checkpoint" in s["reason"] for s in results["skipped"]), results["skipped"]
    results = run_benchmarks(BenchConfig(**base, checkpoint={"digits": str(detector_export["checkpoint"])}))
    assert {r["backend"] for r in results["rows"]} == {"ort-cpu-fp32", "torch-eager-cpu"}
