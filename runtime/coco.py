"""COCO detection data sets, read and checked the way every room needs them: `ferry train --task
detect` (training and validation images), `ferry export` (the validation images a detector is
checked on) and the benchmarks. The layout is the one torchvision's `CocoDetection` reads: a folder
of images and an instances JSON whose `file_name`s are relative to it.

Checked when read, each problem one line naming the JSON and what is wrong: the JSON itself, its
`images` (ids, sizes, files that are missing), `categories` (ids, names) and `annotations` (an
unknown image or category id, a box that is not 4 finite numbers, has no area or lies outside its
image). Odd but valid cases are kept: an image with no boxes (a background image), crowd
annotations (`iscrowd: 1`: left out of training targets, and regions the evaluator ignores), gaps
in the category ids (the classes are the categories in id order; each keeps its COCO id).

mAP is computed by faster-coco-eval (`evaluate`), a C++ implementation of pycocotools' COCOeval.
numpy and pillow only at import (faster-coco-eval loads inside `evaluate`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.runtime.inputs import Skipped

BOX_SLACK = 1.0  # pixels a box may reach past its image's edge (rounding in other tools); it is clipped


class CocoError(FerryError):
    """An instances JSON that cannot be used."""


@dataclass(frozen=True)
class Category:
    id: int  # the COCO category id
    name: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True)
class CocoImage:
    """One image and its boxes: x1, y1, x2, y2 in pixels (float32), the class of each box (an index
    into the set's categories) and whether it is a crowd region."""

    id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float32
    classes: np.ndarray  # (M,) int64
    crowd: np.ndarray  # (M,) bool

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """The training targets: boxes and classes without the crowd regions."""
        keep = ~self.crowd
        return self.boxes[keep], self.classes[keep]


@dataclass
class CocoSet:
    """A checked COCO data set: its categories (in id order: class i is categories[i]) and images."""

    root: Path  # the image folder
    annotations: Path  # the instances JSON
    categories: tuple[Category, ...]
    images: list[CocoImage]
    skipped: list[Skipped] = field(default_factory=list)  # images left out: unreadable files

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def path(self, image: CocoImage) -> Path:
        return self.root / image.file_name

    def subset(self, ids: Iterable[int]) -> CocoSet:
        wanted = set(ids)
        return CocoSet(self.root, self.annotations, self.categories, [im for im in self.images if im.id in wanted],
                       self.skipped)

    def boxes(self) -> int:
        return int(sum(len(im.boxes) for im in self.images))

    def summary(self) -> str:
        empty = sum(1 for im in self.images if not len(im.boxes))
        crowd = int(sum(im.crowd.sum() for im in self.images))
        text = (f"{len(self.images)} images, {self.boxes()} boxes in {len(self.categories)} categories "
                f"({self.annotations.name})" + (f", {empty} without boxes" if empty else "")
                + (f", {crowd} crowd regions" if crowd else ""))
        if self.skipped:
            from ferry.runtime.inputs import describe_skipped

            text += f"; {describe_skipped(self.skipped)}"
        return text

    def ground_truth(self) -> dict[str, Any]:
        """The set as a COCO instances dict (what the evaluator compares detections with)."""
        anns = []
        for im in self.images:
            for box, cls, crowd in zip(im.boxes.tolist(), im.classes.tolist(), im.crowd.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                anns.append({"id": len(anns) + 1, "image_id": im.id, "category_id": self.categories[cls].id,
                             "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        return {"images": [{"id": im.id, "width": im.width, "height": im.height, "file_name": im.file_name}
                           for im in self.images],
                "annotations": anns, "categories": [c.to_dict() for c in self.categories]}


# --- reading -------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CocoError(f"annotations not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CocoError(f"{path} is not a text file ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise CocoError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except OSError as exc:
        raise CocoError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(doc, dict):
        raise CocoError(f"{path} is not a COCO instances file: it holds a {type(doc).__name__}, not an object with "
                        "images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise CocoError(f"{path} is not a COCO instances file: it has no {key!r} list")
        if not isinstance(doc[key], list):
            raise CocoError(f"{path}: {key!r} must be a list (got {type(doc[key]).__name__})")
    return doc


def parse_categories(raw: Sequence[Any], where: str) -> tuple[Category, ...]:
    cats: dict[int, Category] = {}
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str) or not c["name"]:
            raise CocoError(f"{where}: categories[{i}] needs an integer id and a name (got {_show(c)})")
        if c["id"] in cats:
            raise CocoError(f"{where}: category id {c['id']} is listed twice")
        cats[c["id"]] = Category(c["id"], c["name"])
    if not cats:
        raise CocoError(f"{where}: 'categories' is empty (a detector needs at least one category)")
    names = [c.name for c in cats.values()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CocoError(f"{where}: category name(s) listed twice: {', '.join(twice)}")
    return tuple(cats[k] for k in sorted(cats))


def load_coco(images_dir: str | Path, annotations: str | Path, *, categories: Sequence[Category] | None = None,
              check_files: bool = True, workers: int = 4, progress: Callable[[str], None] = lambda _m: None) -> CocoSet:
    """The checked data set of `annotations` over the images in `images_dir`.

    `categories`: the classes a model was trained with; the JSON's categories must be the same ids
    (a validation JSON must match its training JSON). `check_files`: every image named must exist
    (an error, with the count and the first) and be readable with the size the JSON gives (an
    unreadable file is skipped and named; a size that differs is an error)."""
    root, annotations = Path(images_dir), Path(annotations)
    where = str(annotations)
    if not root.is_dir():
        raise CocoError(f"--data-dir {root} is not a folder (expected the images of {annotations.name})")
    doc = read_json(annotations)
    cats = parse_categories(doc["categories"], where)
    if categories is not None and [(c.id, c.name) for c in cats] != [(c.id, c.name) for c in categories]:
        raise CocoError(f"{where}: its categories ({_cat_list(cats)}) are not the model's ({_cat_list(categories)})")
    index = {c.id: i for i, c in enumerate(cats)}

    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str) \
                or not im["file_name"]:
            raise CocoError(f"{where}: images[{i}] needs an integer id and a file_name (got {_show(im)})")
        if not all(_is_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise CocoError(f"{where}: image {im['id']} ({im['file_name']}) needs a positive integer width and height")
        if im["id"] in images:
            raise CocoError(f"{where}: image id {im['id']} is listed twice")
        if Path(im["file_name"]).is_absolute() or ".." in Path(im["file_name"]).parts:
            raise CocoError(f"{where}: image {im['id']}: file_name {im['file_name']!r} must be relative to the image folder")
        images[im["id"]] = {**im, "boxes": [], "classes": [], "crowd": []}
    if not images:
        raise CocoError(f"{where}: 'images' is empty")

    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            raise CocoError(f"{where}: annotations[{i}] is not an object (got {_show(ann)})")
        label = f"annotation {ann.get('id', f'#{i}')}"
        image = images.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
        if image is None:
            raise CocoError(f"{where}: {label} refers to image id {_show(ann.get('image_id'))}, which 'images' does not list")
        cat = ann.get("category_id")
        if not _is_int(cat) or cat not in index:
            raise CocoError(f"{where}: {label} has category id {_show(cat)}, which 'categories' does not list "
                            f"(ids: {', '.join(str(c.id) for c in cats)})")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            raise CocoError(f"{where}: {label} (image {image['file_name']}): bbox must be [x, y, width, height], 4 finite "
                            f"numbers (got {_show(box)})")
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            raise CocoError(f"{where}: {label} (image {image['file_name']}): bbox {_show(box)} has no area")
        W, H = image["width"], image["height"]
        if x < -BOX_SLACK or y < -BOX_SLACK or x + w > W + BOX_SLACK or y + h > H + BOX_SLACK:
            raise CocoError(f"{where}: {label}: bbox {_show(box)} lies outside its image {image['file_name']} ({W}x{H})")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise CocoError(f"{where}: {label}: iscrowd must be 0 or 1 (got {_show(crowd)})")
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(W), x + w), min(float(H), y + h)
        if x2 <= x1 or y2 <= y1:  # within the slack, but wholly past an edge: nothing left after clipping
            if crowd:  # a region to ignore that covers nothing of the image: nothing to ignore
                continue
            raise CocoError(f"{where}: {label}: bbox {_show(box)} lies outside its image {image['file_name']} ({W}x{H}): "
                            "nothing of it is inside")
        image["boxes"].append((x1, y1, x2, y2))
        image["classes"].append(index[cat])
        image["crowd"].append(bool(crowd))

    parsed = [CocoImage(im["id"], im["file_name"], im["width"], im["height"],
                        np.asarray(im["boxes"], np.float32).reshape(-1, 4), np.asarray(im["classes"], np.int64),
                        np.asarray(im["crowd"], bool)) for im in images.values()]
    skipped: list[Skipped] = []
    if check_files:
        parsed, skipped = _check_files(root, parsed, where, workers, progress)
    return CocoSet(root, annotations, cats, parsed, skipped)


def _cat_list(cats: Sequence[Category]) -> str:
    text = ", ".join(f"{c.id}:{c.name}" for c in cats[:12])
    return text + (" ..." if len(cats) > 12 else "")


def _check_files(root: Path, images: list[CocoImage], where: str, workers: int,
                 progress: Callable[[str], None]) -> tuple[list[CocoImage], list[Skipped]]:
    """Every named file must exist; each is opened (its header only) to check it is an image of the
    size the JSON says. Unreadable files are skipped and named; missing files and wrong sizes are errors."""
    from PIL import Image

    from ferry.runtime.images import ImageError, check_image, check_size

    missing = [im.file_name for im in images if not (root / im.file_name).is_file()]
    if missing:
        raise CocoError(f"{where}: {len(missing)} of its {len(images)} images are missing from {root} (e.g. {missing[0]})")
    progress(f"checking the {len(images)} images of {Path(where).name} ...")

    def problem(im: CocoImage) -> str | None:
        try:
            with Image.open(root / im.file_name) as img:
                check_size(img, im.file_name)
                check_image(img, im.file_name)
                size = img.size
        except ImageError as exc:
            return str(exc).split(": ", 1)[-1]
        except Exception as exc:  # noqa: BLE001 - PIL's many errors for a file that is not an image
            return f"not an image Pillow can read ({type(exc).__name__})"
        if size != (im.width, im.height):
            return f"size {size[0]}x{size[1]} but the JSON says {im.width}x{im.height}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(problem, images))
    wrong = [(im, p) for im, p in zip(images, problems) if p and p.startswith("size ")]
    if wrong:
        im, p = wrong[0]
        raise CocoError(f"{where}: image {im.file_name} has {p} ({len(wrong)} such image(s)): boxes would not fit the file")
    good = [im for im, p in zip(images, problems) if p is None]
    skipped = [Skipped(im.file_name, p) for im, p in zip(images, problems) if p is not None]
    if not good:
        raise CocoError(f"{where}: none of its images can be read (e.g. {skipped[0]})")
    return good, skipped


def split_held_out(data: CocoSet, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, held-out ids): a fixed random `fraction` of the images (at least one) held out."""
    if not 0 < fraction < 1:
        raise FerryError(f"--val-fraction must be in (0, 1) (got {fraction})")
    ids = sorted(im.id for im in data.images)
    if len(ids) < 2:
        raise FerryError(f"{data.annotations}: one image cannot be split into training and validation; pass --val-annotations")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    held = sorted(ids[i] for i in order[:n_val])
    kept = sorted(set(ids) - set(held))
    return kept, held


# --- evaluation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageDetections:
    """A model's detections in one image: boxes x1, y1, x2, y2 in its pixels, scores, classes."""

    boxes: np.ndarray  # (K, 4)
    scores: np.ndarray  # (K,)
    classes: np.ndarray  # (K,) int


def evaluate(data: CocoSet, detections: Mapping[int, ImageDetections]) -> dict[str, Any]:
    """COCO box mAP of `detections` (image id -> detections) on `data` with faster-coco-eval: mAP
    over IoU 0.50:0.95 (`map`), at 0.50 (`map50`) and 0.75 (`map75`), and recall at 100 detections.
    Images without an entry count as images where nothing was found."""
    import contextlib
    import io

    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as exc:
        raise FerryError("mAP needs faster-coco-eval: pip install 'ferry[train]'") from exc
    if not data.boxes():
        raise FerryError(f"{data.annotations}: its {len(data.images)} image(s) hold no boxes, so there is no mAP to "
                         "measure; use images with objects")
    results = []
    for image_id, det in detections.items():
        for box, score, cls in zip(np.asarray(det.boxes, float).tolist(), np.asarray(det.scores, float).tolist(),
                                   np.asarray(det.classes).tolist()):
            results.append({"image_id": int(image_id), "category_id": data.categories[int(cls)].id,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluator prints its tables
        gt = COCO(data.ground_truth())
        dt = gt.loadRes(results)
        ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *_a, **_k: None)
        ev.run()
    stats = ev.stats_as_dict
    clean = {k: (round(v, 6) if v >= 0 else None) for k, v in stats.items()}  # -1: no such boxes (e.g. no large ones)
    return {"map": clean["AP_all"], "map50": clean["AP_50"], "map75": clean["AP_75"], "recall": clean["AR_third"],
            "images": len(data.images), "boxes": data.boxes(), "detections": len(results),
            "evaluator": "faster-coco-eval (COCOeval, iouType bbox, maxDets 100)", "all": clean}
