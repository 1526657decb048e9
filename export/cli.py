"""Export a model to validated, self-describing ONNX (opset >= 17, dynamic batch), checked
against PyTorch; optionally int8 (static QDQ) and fp16 variants.

  ferry export mnist-cnn --checkpoint runs/mnist-cnn/checkpoint.pt --out models --data-dir data
  ferry export resnet50 --weights IMAGENET1K_V1|IMAGENET1K_V2|none|PATH --out models"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="mnist-cnn or resnet50")
    parser.add_argument("--out", required=True, help="output folder; writes <model>.onnx (and .int8/.fp16 variants)")
    parser.add_argument("--checkpoint", help="mnist-cnn: the checkpoint.pt written by `ferry train`")
    parser.add_argument("--weights", default="IMAGENET1K_V1",
                        help="resnet50: IMAGENET1K_V1 (default), IMAGENET1K_V2, none (random, marked untrained) or a state-dict file")
    parser.add_argument("--data-dir", default="data", help="mnist-cnn: MNIST folder for the 10,000-image check and int8 calibration (default: data)")
    parser.add_argument("--int8", action="store_true", help="also write <model>.int8.onnx (static QDQ quantization)")
    parser.add_argument("--fp16", action="store_true", help="also write <model>.fp16.onnx (for GPUs; float32 inputs/outputs)")
    parser.add_argument("--calib-dir", help="resnet50 --int8: folder of calibration images")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default: 18)")
    parser.add_argument("--atol", type=float, default=1e-4, help="fp32 tolerance against PyTorch (default: 1e-4)")


def run(args: argparse.Namespace) -> int:
    from ferry.export.pipeline import ExportOptions, export_model

    result = export_model(ExportOptions(
        model=args.model, out=args.out, checkpoint=args.checkpoint, weights=args.weights, data_dir=args.data_dir,
        int8=args.int8, fp16=args.fp16, calib_dir=args.calib_dir, opset=args.opset, atol=args.atol,
    ))
    for precision, path in result.paths.items():
        print(f"{precision}: {path}")
    if result.metadata["fp32"].get("untrained"):
        print("note: random weights (untrained); predictions are meaningless, fine for speed work")
    return 0
