"""Train the handwritten-digit CNN on MNIST (60,000 training images less a validation split;
the official 10,000 test images give the final figure). Writes checkpoint.pt, metrics.json and
curves.png into --out. Every option's default is the recommended recipe."""

from __future__ import annotations

import argparse
import dataclasses

from ferry.core.errors import FerryError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.train.config import TrainConfig  # dataclass only: no torch

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.name == "channels":
            parser.add_argument(flag, type=int, nargs=3, metavar="C", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out")
    parser.add_argument(
        "--dry-run", action="store_true", help="one quick epoch on 2,048 images to check the set-up (results are not meaningful)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """Defaults, or on --resume the checkpoint's recipe, overridden by the flags actually given."""
    from ferry.train.config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "channels" in given:
        given["channels"] = tuple(given["channels"])
    base = TrainConfig(**{k: v for k, v in given.items() if k in ("out", "data_dir")})
    if args.resume:
        from pathlib import Path

        from ferry.train.trainer import CHECKPOINT_NAME, load_checkpoint

        ckpt = Path(base.out) / CHECKPOINT_NAME
        if not ckpt.exists():
            raise FerryError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
        base = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
    return dataclasses.replace(base, **given)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    from ferry.train.trainer import train

    try:
        metrics = train(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
    except KeyboardInterrupt:
        import sys

        print(f"\nferry train: interrupted; the last completed epoch is saved in {cfg.out}. "
              f"Continue with: ferry train --resume --out {cfg.out} --data-dir {cfg.data_dir}", file=sys.stderr)
        return 130
    print(f"test_accuracy={metrics['test_accuracy']:.4f}")
    return 0
