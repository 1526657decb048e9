"""`ferry`: one command, a subcommand per stage. Each stage's CLI module is torch-free at import,
so `ferry --help` works without torch; the heavy libraries load inside the subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ferry import __version__
from ferry.core.errors import FerryError

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ferry.train.cli", "train the digit CNN on MNIST, fine-tune a torchvision classifier (--arch) or train a detector"),
    "export": ("ferry.export.cli", "export a model to validated ONNX (fp32, int8, fp16)"),
    "predict": ("ferry.runtime.cli", "predict images with an exported model (onnxruntime, no torch)"),
    "draw": ("ferry.app.draw", "draw a digit with the mouse and see the prediction (Tk window)"),
    "bench": ("ferry.bench.cli", "benchmark latency and throughput on the CPU and GPU: PyTorch, onnxruntime, OpenVINO, auto"),
    "serve": ("ferry.serve.cli", "serve models over HTTP: one process, or Ray Serve across a cluster (--address)"),
    "batch": ("ferry.batch.cli", "predict a folder or list of images on Ray Data, locally or on a cluster (Parquet out)"),
}

# The import name of every library ferry's code imports beyond the standard library, numpy and
# pillow -> the extra of pyproject.toml that installs it: a missing one is one line naming it.
EXTRA_OF: dict[str, str] = {
    "onnxruntime": "cpu",
    **dict.fromkeys(("torch", "torchvision", "onnx", "onnxscript", "matplotlib", "tqdm", "skimage", "scipy", "pydantic",
                     "annotated_types", "faster_coco_eval"), "train"),
    **dict.fromkeys(("starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client"), "serve"),
    **dict.fromkeys(("ray", "pyarrow", "obstore"), "scale"),
    "openvino": "openvino",
    **dict.fromkeys(("tritonclient", "google"), "triton"),  # google.protobuf: with tritonclient[grpc]
    **dict.fromkeys(("aiohttp", "pytest", "pytest_benchmark"), "dev"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Train, export to ONNX, run, serve and benchmark image classifiers (the digit CNN, any torchvision "
                    "classifier) and detectors.",
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except FerryError as exc:
        print(f"ferry {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = EXTRA_OF.get(top)
        if extra is None:
            raise
        print(f"ferry {args.command}: error: needs the Python package {top!r}; "
              f"install it with: pip install 'ferry[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ferry {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ferry predict ... | head`: the reader left; stop quietly, like other tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
