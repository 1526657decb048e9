"""Train a classifier. `--arch mnist-cnn` (the default) trains the handwritten-digit CNN on MNIST
(--data-dir holds MNIST/raw/*-ubyte); any torchvision classification architecture (`--arch resnet18`,
`mobilenet_v3_large`, `efficientnet_b0`, `convnext_tiny`, ...) is fine-tuned on a folder of images
(--data-dir holds DATA/<class>/*.jpg, or DATA/train/<class> and DATA/val/<class>). Writes
checkpoint.pt, metrics.json and plots into --out. Every option's default is the recommended recipe;
where the two differ, --help shows both.

  ferry train --data-dir data                                  # the digit CNN on MNIST
  ferry train --arch resnet18 --data-dir photos --out runs/r18 # fine-tune on your images"""

from __future__ import annotations

import argparse
import dataclasses

from ferry.core.errors import FerryError

CNN = "mnist-cnn"


def _configs():
    from ferry.train.config import TrainConfig  # dataclasses only: no torch
    from ferry.train.finetune_config import FinetuneConfig

    return TrainConfig, FinetuneConfig


def _base_type(annotation: str) -> str:
    """`Annotated[int, Ge(1)]` -> "int" (the configs declare ranges in their types)."""
    text = annotation.removeprefix("Annotated[")
    return text.split("[", 1)[0].split(",", 1)[0].strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    TrainConfig, FinetuneConfig = _configs()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--arch", default=CNN, metavar="ARCH",
                        help=f"{CNN} (default: the digit CNN on MNIST) or a torchvision classification architecture")
    cnn = {f.name: f for f in dataclasses.fields(TrainConfig)}
    tv = {f.name: f for f in dataclasses.fields(FinetuneConfig) if f.name != "arch"}
    for name in dict.fromkeys([*cnn, *tv]):
        f = cnn.get(name) or tv[name]
        flag = "--" + name.replace("_", "-")
        defaults = []
        for label, fields in ((CNN, cnn), ("torchvision", tv)):
            if name in fields:
                d = fields[name].default
                defaults.append(f"{list(d) if isinstance(d, tuple) else d} for {label}")
        only = f" [{CNN} only]" if name not in tv else (" [torchvision only]" if name not in cnn else "")
        text = f.metadata.get("help", "")
        if name in cnn and name in tv and tv[name].metadata.get("help") != text:
            text = f"{CNN}: {text}; torchvision: {tv[name].metadata.get('help', '')}"
        help_text = f"{text}{only} (default: {', '.join(defaults)})"
        kind = _base_type(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name == "channels":
            parser.add_argument(flag, type=int, nargs=3, metavar="C", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=argparse.SUPPRESS,
                                help=help_text)
    parser.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out")
    parser.add_argument("--dry-run", action="store_true",
                        help="a quick run on a few images to check the set-up (results are not meaningful)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """Defaults (or, on --resume, the checkpoint's recipe), overridden by the flags actually given.
    A flag that belongs to the other kind of model is an error."""
    TrainConfig, FinetuneConfig = _configs()
    cls = TrainConfig if args.arch == CNN else FinetuneConfig
    names = {f.name for f in dataclasses.fields(cls)}
    all_names = {f.name for c in (TrainConfig, FinetuneConfig) for f in dataclasses.fields(c)} - {"arch"}
    wrong = sorted(n for n in all_names - names if hasattr(args, n))
    if wrong:
        kind = f"--arch {args.arch}" if cls is FinetuneConfig else f"the {CNN}"
        raise FerryError(f"{', '.join('--' + n.replace('_', '-') for n in wrong)} do(es) not apply to {kind}")
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if "channels" in given:
        given["channels"] = tuple(given["channels"])
    if cls is FinetuneConfig:
        given["arch"] = args.arch
    base = cls(**{k: v for k, v in given.items() if k in ("out", "data_dir", "arch")})
    if args.resume:
        from pathlib import Path

        import torch

        ckpt = Path(base.out) / "checkpoint.pt"
        if not ckpt.exists():
            raise FerryError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]
        except Exception as exc:  # noqa: BLE001 - the trainer's own loader gives the detailed message
            raise FerryError(f"checkpoint {ckpt} is corrupt or unreadable: {type(exc).__name__}") from exc
        base = cls.from_dict(saved)
    return dataclasses.replace(base, **given)


def run(args: argparse.Namespace) -> int:
    import sys

    cfg = config_from_args(args)
    cfg.validate()
    try:
        if args.arch == CNN:
            from ferry.train.trainer import train

            metrics = train(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
            print(f"test_accuracy={metrics['test_accuracy']:.4f}")
        else:
            from ferry.train.finetune import finetune

            metrics = finetune(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
            print(f"top1={metrics['top1']:.4f}")
    except KeyboardInterrupt:
        print(f"\nferry train: interrupted; the last completed epoch is saved in {cfg.out}. "
              f"Continue with: ferry train --resume --arch {args.arch} --out {cfg.out} --data-dir {cfg.data_dir}",
              file=sys.stderr)
        return 130
    return 0
