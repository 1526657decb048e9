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
    "train": ("ferry.train.cli", "train the handwritten-digit CNN on MNIST"),
    "export": ("ferry.export.cli", "export a model to validated ONNX (fp32, int8, fp16)"),
    "predict": ("ferry.runtime.cli", "predict images with an exported model (onnxruntime, no torch)"),
    "draw": ("ferry.app.draw", "draw a digit with the mouse and see the prediction (Tk window)"),
    "bench": ("ferry.bench.cli", "benchmark GPU and CPU latency and throughput (PyTorch vs onnxruntime)"),
    "serve": ("ferry.serve.cli", "serve models over HTTP: one process, or Ray Serve across a cluster (--address)"),
    "batch": ("ferry.batch.cli", "predict a folder or list of images on Ray Data, locally or on a cluster (Parquet out)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Train, export to ONNX, run and benchmark image classifiers (mnist-cnn, resnet50).",
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
        extras = {"onnxruntime": "cpu", "ray": "scale", "pyarrow": "scale", "uvicorn": "serve", "starlette": "serve",
                  "fastapi": "serve", "aiohttp": "serve", "tritonclient": "triton"}
        top = (exc.name or "").split(".")[0]
        if top in {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "tqdm", *extras}:
            extra = extras.get(top, "train")
            print(
                f"ferry {args.command}: error: needs the Python package {exc.name!r}; "
                f"install it with: pip install 'ferry[{extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        print(f"ferry {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ferry predict ... | head`: the reader left; stop quietly, like other tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
