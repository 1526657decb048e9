"""Export a model to validated, self-describing ONNX (opset >= 17, dynamic batch), checked against
PyTorch; optionally int8 (static QDQ, portable across x86 CPU classes) and fp16 variants. The files
of one export are written as a set: all of them pass, or none replaces the previous set.

  ferry export mnist-cnn --checkpoint runs/mnist-cnn/checkpoint.pt --data-dir data --out models --int8 --fp16
  ferry export resnet50 --weights IMAGENET1K_V2|DEFAULT|none|PATH --out models [--int8 --calib-dir DIR]
  ferry export mobilenet_v3_large --weights none --out models        # any torchvision classifier by name
  ferry export resnet18 --checkpoint runs/r18/checkpoint.pt --out models --int8   # fine-tuned by ferry train
  ferry export fcos_small --checkpoint runs/digits/checkpoint.pt --name digits --out models --fp16   # a detector
  ferry export retinanet_resnet50_fpn_v2 --weights DEFAULT --out models   # a torchvision COCO detector

A detector's graph holds its post-processing (score threshold, NMS); it is checked against PyTorch
(the same detections, and the same COCO mAP within 0.5 points on its validation images).

Exit codes: 0 done, 2 bad input or a failed check, 3 pretrained weights unavailable (offline)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL", help="mnist-cnn, a torchvision classification architecture (resnet50, ...), "
                        "or a detector (fcos_small, fasterrcnn_mobilenet_v3_large_fpn, retinanet_resnet50_fpn_v2, ...)")
    parser.add_argument("--out", required=True, help="output folder; writes <name>.onnx (and .int8/.fp16 variants)")
    parser.add_argument("--checkpoint", help="mnist-cnn: the checkpoint.pt of `ferry train`; ARCH: the checkpoint.pt of "
                        "`ferry train --arch ARCH` (a model fine-tuned on your images)")
    parser.add_argument("--weights", default="DEFAULT",
                        help="ARCH without --checkpoint: a weights name of ARCH (DEFAULT, IMAGENET1K_V1, ...), none "
                             "(random, marked untrained) or a state-dict file (default: DEFAULT)")
    parser.add_argument("--name", help="model name in the metadata and file names (default: MODEL)")
    parser.add_argument("--data-dir", help="mnist-cnn: the MNIST folder (default: data); fine-tuned: the image folder "
                        "(default: the one the checkpoint was trained on); detector: the images of --annotations")
    parser.add_argument("--annotations", metavar="JSON", help="detector: a COCO instances JSON of images to check it on "
                        "(default: the checkpoint's validation images)")
    parser.add_argument("--int8", action="store_true", help="also write <name>.int8.onnx (static QDQ quantization)")
    parser.add_argument("--fp16", action="store_true", help="also write <name>.fp16.onnx (for GPUs; float32 inputs/outputs)")
    parser.add_argument("--calib-dir", help="pretrained ARCH --int8: folder of calibration images (a few hundred)")
    parser.add_argument("--int8-max-drop", type=float, metavar="PP",
                        help="classifiers: allowed int8 accuracy loss in percentage points on labelled held-out images "
                             "(default: 0.1 for mnist-cnn, 0.5 for fine-tuned models; a detector's gate is 0.5 mAP points)")
    parser.add_argument("--triton-repo", metavar="DIR",
                        help="also write a Triton model repository: DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx")
    parser.add_argument("--triton-precision", choices=["fp32", "fp16", "int8"], default="fp32",
                        help="which exported file goes into the Triton repository (default: fp32)")
    parser.add_argument("--triton-max-batch", type=int, default=64, help="Triton max_batch_size (default: 64)")
    parser.add_argument("--triton-trt-fp16", action="store_true",
                        help="ask Triton's onnxruntime backend for TensorRT FP16 acceleration on the GPU")
    parser.add_argument("--opset", type=int, default=18,
                        help="ONNX opset: 17 up to the newest the installed onnx knows (default: 18)")
    parser.add_argument("--atol", type=float,
                        help="classifiers: fp32 tolerance against PyTorch (default: 1e-4; a detector's boxes are checked "
                             "within 0.5 px)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ferry.core.errors import FerryError
    from ferry.export.pipeline import ExportOptions, export_model

    if args.int8_max_drop is not None and not args.int8_max_drop >= 0:  # NaN too: it would turn the gate off
        raise FerryError(f"--int8-max-drop must be >= 0 (got {args.int8_max_drop})")
    if args.triton_repo:  # before the export: a bad option found after it would have replaced the files for nothing
        from ferry.core.fileio import check_folder_writable

        if args.triton_max_batch < 1:
            raise FerryError(f"--triton-max-batch must be >= 1 (got {args.triton_max_batch})")
        if args.triton_precision != "fp32" and not getattr(args, args.triton_precision):
            raise FerryError(f"--triton-precision {args.triton_precision}: export it too (--{args.triton_precision})")
        check_folder_writable(args.triton_repo, "--triton-repo")

    result = export_model(ExportOptions(
        model=args.model, out=args.out, checkpoint=args.checkpoint, weights=args.weights, name=args.name,
        data_dir=args.data_dir, annotations=args.annotations, int8=args.int8, fp16=args.fp16, calib_dir=args.calib_dir,
        int8_max_drop_pp=args.int8_max_drop, opset=args.opset, atol=args.atol,
    ))
    for precision, path in result.paths.items():
        print(f"{precision}: {path}")
    if args.triton_repo:
        from ferry.export.triton import DOCKER_RUN, write_repository

        folder = write_repository(result.paths[args.triton_precision], result.metadata[args.triton_precision],
                                  args.triton_repo, max_batch_size=args.triton_max_batch, tensorrt_fp16=args.triton_trt_fp16)
        print(f"triton: {folder} (config.pbtxt checked against Triton's model-config schema); serve it with:\n  "
              + DOCKER_RUN.format(repo=Path(args.triton_repo).resolve()))
    if result.metadata["fp32"].untrained:
        print("note: random weights (untrained); predictions are meaningless, fine for speed work")
    return 0
