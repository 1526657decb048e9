"""Predict with an exported model on images or folders of images (onnxruntime only, no torch).

  ferry predict models/resnet50.onnx photo.jpg --top-k 5
  ferry predict models/mnist-cnn.onnx digits/ --json results.json
  ferry predict models/digits.onnx scenes/ --draw boxes/ --min-score 0.5     # a detector

Prints the predicted class index and label with its probability for each image; for a detector,
each detection (label, score, box x1,y1,x2,y2 in the image's pixels), and with --draw DIR saves
each image with its boxes drawn. A folder is processed in batches; an image that cannot be read is
reported and the others still run (the exit code is then 1)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ferry.core.errors import FerryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.runtime.engines import CHOICES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="an .onnx file written by `ferry export`")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--top-k", type=int, default=1, help="also list the K most likely classes (default: 1)")
    parser.add_argument("--provider", choices=CHOICES, default="auto",
                        help="what runs the model: auto (CUDA if it works, else the fastest validated CPU engine for "
                             "this model, measured once and cached), cpu, cuda, tensorrt (onnxruntime), openvino, "
                             "openvino-bf16 (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default: 32)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write machine-readable results to FILE (or stdout with no FILE)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="detectors: show detections scoring at least this (default: 0.5)")
    parser.add_argument("--draw", metavar="DIR", help="detectors: save each image with its boxes drawn into DIR (PNG)")


def run(args: argparse.Namespace) -> int:
    from ferry.core.fileio import write_json_atomic
    from ferry.core.progress import Progress
    from ferry.runtime.detector import open_model
    from ferry.runtime.images import quiet_bomb_warnings
    from ferry.runtime.inputs import expand_inputs

    quiet_bomb_warnings()  # a bomb is reported as an error of its own; Pillow's warning would repeat it
    if args.top_k < 1:
        raise FerryError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.batch_size < 1:
        raise FerryError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.min_score is not None and not 0 <= args.min_score <= 1:
        raise FerryError(f"--min-score must be in [0, 1] (got {args.min_score})")
    clf = open_model(args.model, provider=args.provider)
    if clf.task == "detect":
        return _run_detector(clf, args)
    if args.draw or args.min_score is not None:
        raise FerryError(f"--draw and --min-score are for detectors; {args.model} is a classifier")
    files = expand_inputs(args.inputs)
    if not files:
        raise FerryError("no input files found")
    _check_json_target(args, files)
    to_stdout_json = args.json == "-"
    say = (lambda s: print(s, file=sys.stderr)) if to_stdout_json else print
    say(f"model: {clf.name} ({clf.path}), provider: {clf.provider.describe()}")
    if clf.untrained:
        say("warning: this model has random weights (exported with --weights none): its predictions are meaningless")

    progress = Progress(len(files), desc="predicting", enabled=None if len(files) > args.batch_size else False)
    outcomes = []
    for outcome in clf.predict_many(files, top_k=args.top_k, batch_size=args.batch_size):
        progress.update()
        outcomes.append(outcome)
        if not to_stdout_json:
            _print_outcome(outcome, args.top_k)
    progress.close()
    failed = [o for o in outcomes if not o.ok]
    if args.json:
        doc = {
            "model": clf.name,
            "model_path": str(clf.path),
            "provider": clf.provider.used,
            "provider_requested": clf.provider.requested,
            "provider_note": clf.provider.note,
            "engine": clf.provider.engine,
            "precision": clf.provider.precision,
            "untrained": clf.untrained,
            "results": [o.to_dict() for o in outcomes],
            "failed": len(failed),
        }
        if to_stdout_json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            write_json_atomic(args.json, doc)
            print(f"wrote {args.json}")
    if failed:
        print(f"{len(failed)} of {len(outcomes)} inputs failed", file=sys.stderr)
        return 1
    return 0


def _check_json_target(args: argparse.Namespace, files: list) -> None:
    """Before the work (a bad --json FILE found after it would waste it): FILE can be written and is
    neither the model nor an input."""
    if args.json and args.json != "-":
        from ferry.core.fileio import check_file_writable

        check_file_writable(args.json, "--json", [(args.model, "the model"), *((f, f"an input ({f})") for f in files)])


def _print_outcome(outcome, top_k: int) -> None:
    if not outcome.ok:
        print(f"ERROR {outcome.error}", file=sys.stderr)  # the error names its file
        return
    p = outcome.prediction
    print(f"{outcome.source}: predicted {p.index} ({p.label}) with probability {p.probability:.4f}")
    if top_k > 1:
        for rank, c in enumerate(p.top_k, 1):
            print(f"    {rank:>2}. {c.index:>4} {c.label:<30} {c.probability:.4f}")


def _run_detector(det, args: argparse.Namespace) -> int:
    """`ferry predict` on a detector: detections per image, --json, --draw DIR."""
    from pathlib import Path

    from ferry.core.fileio import atomic_path, check_folder_writable, write_json_atomic
    from ferry.core.progress import Progress
    from ferry.runtime.detector import DEFAULT_MIN_SCORE, draw_detections
    from ferry.runtime.images import load_image
    from ferry.runtime.inputs import expand_inputs

    if args.top_k != 1:
        raise FerryError("--top-k is for classifiers; a detector lists every detection above --min-score")
    files = expand_inputs(args.inputs)
    if not files:
        raise FerryError("no input files found")
    draw_dir = Path(args.draw) if args.draw else None
    if draw_dir is not None:
        check_folder_writable(draw_dir, "--draw")
        where = os.path.realpath(draw_dir)
        inside = next((f for f in files if os.path.realpath(os.path.dirname(os.path.abspath(f))) == where), None)
        if inside is not None:  # a drawing named after its input (x.png) would replace it
            raise FerryError(f"--draw {draw_dir} holds inputs (e.g. {inside}): the drawings could replace them; "
                             f"choose another folder")
        used: set[str] = set()
        targets = [_draw_target(draw_dir, f, used) for f in files]  # in the inputs' order (one listed twice: two)
        taken = [t for t in targets if os.path.lexists(t)]
        if taken:  # never written over: a drawing of an earlier run, or a file of the user's
            raise FerryError(f"--draw {draw_dir} already holds {len(taken)} file(s) the drawings would be named (e.g. "
                             f"{taken[0].name}); choose another folder, or remove them")
    _check_json_target(args, files)
    min_score = DEFAULT_MIN_SCORE if args.min_score is None else args.min_score
    to_stdout_json = args.json == "-"
    say = (lambda s: print(s, file=sys.stderr)) if to_stdout_json else print
    say(f"model: {det.name} ({det.path}), detector, provider: {det.provider.describe()}")
    if det.untrained:
        say("warning: this model has random weights (exported with --weights none): its detections are meaningless")
    progress = Progress(len(files), desc="detecting", enabled=None if len(files) > args.batch_size else False)
    outcomes, drawn = [], []
    for n, outcome in enumerate(det.detect_many(files, batch_size=args.batch_size, min_score=min_score)):
        progress.update()
        if outcome.ok and draw_dir is not None:
            target = targets[n]
            try:
                picture = draw_detections(load_image(outcome.source), outcome.result)
                with atomic_path(target) as tmp:
                    picture.save(tmp, format="PNG")
                drawn.append(str(target))
            except (FerryError, OSError) as exc:
                outcome = type(outcome)(outcome.source, error=f"{outcome.source}: drawing failed: {exc}")
        outcomes.append(outcome)
        if not to_stdout_json:
            _print_detections(outcome)
    progress.close()
    failed = [o for o in outcomes if not o.ok]
    if args.json:
        doc = {"model": det.name, "model_path": str(det.path), "task": "detect", "provider": det.provider.used,
               "provider_requested": det.provider.requested, "provider_note": det.provider.note,
               "engine": det.provider.engine, "precision": det.provider.precision, "untrained": det.untrained,
               "min_score": min_score, "box_format": "x1, y1, x2, y2 in the image's pixels",
               "results": [o.to_dict() for o in outcomes], "failed": len(failed)}
        if to_stdout_json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            write_json_atomic(args.json, doc)
            print(f"wrote {args.json}")
    if drawn:
        say(f"drew the boxes of {len(drawn)} image(s) into {draw_dir}")
    if failed:
        print(f"{len(failed)} of {len(outcomes)} inputs failed", file=sys.stderr)
        return 1
    return 0


def _draw_target(folder, source: str, used: set):
    """DIR/<file name>.png, made unique when two inputs share a name."""
    from pathlib import Path

    stem = Path(source).stem
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return Path(folder) / name


def _print_detections(outcome) -> None:
    if not outcome.ok:
        print(f"ERROR {outcome.error}", file=sys.stderr)
        return
    found = outcome.result
    print(f"{outcome.source}: {len(found.detections)} detection(s) scoring >= {found.min_score:g}")
    for d in found.detections:
        x1, y1, x2, y2 = d.box
        print(f"    {d.label:<12} {d.score:.3f}  box {x1:.1f},{y1:.1f},{x2:.1f},{y2:.1f}")
