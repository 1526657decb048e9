"""COCO mAP of an exported detector on a COCO data set (the digit scenes' 1,000 test scenes in `make
demo-detect`), through the torch-free runtime exactly as `ferry predict` runs it, and, with
--checkpoint, of the PyTorch checkpoint it was exported from on the same images (the difference in
points is the export's cost). faster-coco-eval computes the mAPs.

  python -m ferry.bench.detect_map --model models/digits.onnx --data-dir data/digit-scenes/test \\
      --annotations data/digit-scenes/test.json [--checkpoint runs/digits/checkpoint.pt] [--out FILE] [--figure PNG]

--figure saves the first three images with their detections (scoring at least 0.5) drawn, side by
side at twice their size (the picture in docs: "Detection").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def onnx_map(model: str | Path, data, *, provider: str = "cpu", batch_size: int = 16) -> dict[str, Any]:
    """mAP of the exported model on `data` (a CocoSet), every detection its graph keeps."""
    from ferry.runtime.coco import ImageDetections, evaluate
    from ferry.runtime.detector import Detector

    det = Detector.from_onnx(model, provider=provider)
    images = list(data.images)
    found, failed = {}, []
    t0 = time.perf_counter()
    for im, outcome in zip(images, det.detect_many([str(data.path(im)) for im in images], batch_size=batch_size,
                                                    min_score=0.0)):
        if not outcome.ok:
            failed.append(outcome.error)
            continue
        ds = outcome.result.detections
        found[im.id] = ImageDetections([d.box for d in ds], [d.score for d in ds], [d.index for d in ds])
    seconds = time.perf_counter() - t0
    return {**evaluate(data, found), "failed": failed, "seconds": seconds, "provider": det.provider.describe(),
            "images_per_second": len(images) / seconds if seconds else None}


def checkpoint_map(checkpoint: str | Path, data, *, batch_size: int = 16) -> dict[str, Any]:
    """mAP of the PyTorch checkpoint on `data`, through the same preprocessing and post-processing."""
    from ferry.models import checkpoint as ckpt
    from ferry.models.detectors import torch_detections
    from ferry.runtime.coco import evaluate
    from ferry.runtime.presets import Preprocess

    state = ckpt.load_detector_state(checkpoint)
    _, module = ckpt.detector_from_state(state, checkpoint)
    return evaluate(data, torch_detections(module, data, Preprocess.from_dict(state["preprocess"]), batch_size=batch_size))


def figure(model: str | Path, data, target: str | Path, *, count: int = 3, zoom: int = 2) -> None:
    """The first `count` images of `data` with the model's detections drawn, side by side, enlarged."""
    from PIL import Image

    from ferry.core.fileio import atomic_path
    from ferry.runtime.detector import Detector, draw_detections
    from ferry.runtime.images import load_image

    det = Detector.from_onnx(model, provider="cpu")
    pictures = []
    for im in data.images[:count]:
        image = load_image(data.path(im))
        big = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
        found = det.detect(image)
        scaled = type(found)(tuple(type(d)(tuple(v * zoom for v in d.box), d.label, d.category_id, d.index, d.score)
                                   for d in found.detections), big.width, big.height, found.provider, found.min_score)
        pictures.append(draw_detections(big, scaled, width=2))
    gap = 8
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), max(p.height for p in pictures)),
                      (255, 255, 255))
    x = 0
    for p in pictures:
        sheet.paste(p, (x, 0))
        x += p.width + gap
    with atomic_path(target) as tmp:
        sheet.save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported detector (.onnx)")
    parser.add_argument("--data-dir", required=True, help="the images of --annotations")
    parser.add_argument("--annotations", required=True, help="a COCO instances JSON")
    parser.add_argument("--checkpoint", help="the detector's checkpoint: its mAP on the same images too")
    parser.add_argument("--provider", default="cpu", help="what runs the ONNX model (default: cpu)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--figure", metavar="PNG", help="save the first three images with their boxes drawn here")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import cpu_info
    from ferry.runtime import coco, contract

    try:
        meta = contract.read(args.model)
        cats = [coco.Category(i, n) for i, n in meta.detection.categories] if meta.detection else None
        data = coco.load_coco(args.data_dir, args.annotations, categories=cats)
        result: dict[str, Any] = {"model": str(args.model), "dataset": f"{Path(args.annotations).name} "
                                  f"({len(data.images)} images, {data.boxes()} boxes)", "onnx": onnx_map(args.model, data,
                                                                                                          provider=args.provider)}
        if args.checkpoint:
            result["checkpoint"] = checkpoint_map(args.checkpoint, data)
            result["difference_pp"] = {k: round(100 * (result["onnx"][k] - result["checkpoint"][k]), 3) for k in ("map", "map50")}
        if args.figure:
            figure(args.model, data, args.figure)
    except (OSError, FerryError) as exc:
        print(f"detect_map: error: {exc}", file=sys.stderr)
        return 2
    result["machine"] = cpu_info()
    o = result["onnx"]
    print(f"{result['dataset']}: ONNX mAP@[.5:.95] {o['map']:.4f}, mAP@0.5 {o['map50']:.4f} ({o['provider']})")
    if args.checkpoint:
        c = result["checkpoint"]
        print(f"  checkpoint (PyTorch): mAP@[.5:.95] {c['map']:.4f}, mAP@0.5 {c['map50']:.4f}; ONNX - PyTorch "
              f"{result['difference_pp']['map']:+.2f} / {result['difference_pp']['map50']:+.2f} points")
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
