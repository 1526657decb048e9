"""Predict with an exported model on images or folders of images (onnxruntime only, no torch).

  ferry predict models/resnet50.onnx photo.jpg --top-k 5
  ferry predict models/mnist-cnn.onnx digits/ --json results.json

Prints the predicted class index and label with its probability for each image. A folder is
processed in batches; an image that cannot be read is reported and the others still run (the
exit code is then 1)."""

from __future__ import annotations

import argparse
import json
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


def run(args: argparse.Namespace) -> int:
    from ferry.core.fileio import write_json_atomic
    from ferry.core.progress import Progress
    from ferry.runtime.classifier import Classifier
    from ferry.runtime.images import quiet_bomb_warnings
    from ferry.runtime.inputs import expand_inputs

    quiet_bomb_warnings()  # a bomb is reported as an error of its own; Pillow's warning would repeat it
    if args.top_k < 1:
        raise FerryError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.batch_size < 1:
        raise FerryError(f"--batch-size must be >= 1 (got {args.batch_size})")
    clf = Classifier.from_onnx(args.model, provider=args.provider)
    files = expand_inputs(args.inputs)
    if not files:
        raise FerryError("no input files found")
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


def _print_outcome(outcome, top_k: int) -> None:
    if not outcome.ok:
        print(f"ERROR {outcome.error}", file=sys.stderr)  # the error names its file
        return
    p = outcome.prediction
    print(f"{outcome.source}: predicted {p.index} ({p.label}) with probability {p.probability:.4f}")
    if top_k > 1:
        for rank, c in enumerate(p.top_k, 1):
            print(f"    {rank}. {c.index:>4} {c.label:<30} {c.probability:.4f}")
