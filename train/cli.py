"""Train a classifier or a detector. `--arch mnist-cnn` (the default) trains the handwritten-digit CNN
on MNIST (--data-dir holds MNIST/raw/*-ubyte); any torchvision classification architecture (`--arch
resnet18`, `mobilenet_v3_large`, `efficientnet_b0`, `convnext_tiny`, ...) is fine-tuned on a folder of
images (--data-dir holds DATA/<class>/*.jpg, or DATA/train/<class> and DATA/val/<class>). `--task
detect` trains a detector (`--arch fcos_small`, the default, or a torchvision detector such as
fasterrcnn_mobilenet_v3_large_fpn, retinanet_resnet50_fpn_v2, fcos_resnet50_fpn,
ssdlite320_mobilenet_v3_large) on a COCO data set: --data-dir holds the images, --annotations the
instances JSON. Writes checkpoint.pt, metrics.json and plots into --out. Every option's default is
the recommended recipe; where they differ, --help shows each.

  ferry train --data-dir data                                  # the digit CNN on MNIST
  ferry train --arch resnet18 --data-dir photos --out runs/r18 # fine-tune on your images
  ferry train --task detect --data-dir scenes/train --annotations scenes/train.json --out runs/digits
      # a detector (add --val-data-dir scenes/val --val-annotations scenes/val.json for your own validation set)"""

from __future__ import annotations

import argparse
import dataclasses
import os

from ferry.core.errors import FerryError

CNN = "mnist-cnn"
TASKS = ("classify", "detect")


def _configs():
    from ferry.train.config import TrainConfig  # dataclasses only: no torch
    from ferry.train.detect_config import DetectConfig
    from ferry.train.finetune_config import FinetuneConfig

    return TrainConfig, FinetuneConfig, DetectConfig


def _base_type(annotation: str) -> str:
    """`Annotated[int, Ge(1)]` -> "int" (the configs declare ranges in their types)."""
    text = annotation.removeprefix("Annotated[")
    return text.split("[", 1)[0].split(",", 1)[0].strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    TrainConfig, FinetuneConfig, DetectConfig = _configs()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=TASKS, default="classify",
                        help="classify (default) or detect (a detector on a COCO data set)")
    parser.add_argument("--arch", default=None, metavar="ARCH",
                        help=f"{CNN} (default: the digit CNN on MNIST) or a torchvision classification architecture; "
                             "with --task detect: fcos_small (default) or a torchvision detector")
    kinds = ((CNN, {f.name: f for f in dataclasses.fields(TrainConfig)}),
             ("torchvision", {f.name: f for f in dataclasses.fields(FinetuneConfig) if f.name != "arch"}),
             ("detect", {f.name: f for f in dataclasses.fields(DetectConfig) if f.name != "arch"}))
    for name in dict.fromkeys(n for _, fields in kinds for n in fields):
        having = [(label, fields[name]) for label, fields in kinds if name in fields]
        f = having[0][1]
        flag = "--" + name.replace("_", "-")
        values = [(label, list(g.default) if isinstance(g.default, tuple) else g.default) for label, g in having
                  if g.default not in ("", None)]  # none: the help text says what happens without it
        if len({repr(v) for _, v in values}) == 1 and len(values) == len(having):
            defaults = [str(values[0][1])]  # the same for every kind that has it
        else:
            defaults = [f"{v} for {label}" for label, v in values]
        texts = {g.metadata.get("help", "") for _, g in having}
        text = f.metadata.get("help", "") if len(texts) == 1 else \
            "; ".join(f"{label}: {g.metadata.get('help', '')}" for label, g in having)
        only = f" [{' and '.join(label for label, _ in having)} only]" if len(having) < len(kinds) and " only" not in text else ""
        help_text = f"{text}{only}" + (f" (default: {', '.join(defaults)})" if defaults else "")
        kind = _base_type(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name == "channels":
            parser.add_argument(flag, type=int, nargs=3, metavar="C", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=argparse.SUPPRESS,
                                help=help_text)
    parser.add_argument("--resume", action="store_true", help="continue from the last completed epoch in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that already holds a trained model (its files are replaced)")
    parser.add_argument("--dry-run", action="store_true",
                        help="a quick run on a few images to check the set-up (results are not meaningful)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _kind(args: argparse.Namespace):
    TrainConfig, FinetuneConfig, DetectConfig = _configs()
    if getattr(args, "task", "classify") == "detect":
        return DetectConfig
    return TrainConfig if (args.arch or CNN) == CNN else FinetuneConfig


def config_from_args(args: argparse.Namespace):
    """Defaults (or, on --resume, the checkpoint's recipe), overridden by the flags actually given.
    A flag that belongs to another kind of model is an error."""
    configs = _configs()
    TrainConfig, FinetuneConfig, DetectConfig = configs
    cls = _kind(args)
    if cls is TrainConfig:
        args.arch = CNN
    names = {f.name for f in dataclasses.fields(cls)}
    all_names = {f.name for c in configs for f in dataclasses.fields(c)} - {"arch"}
    wrong = sorted(n for n in all_names - names if hasattr(args, n))
    if wrong:
        kind = {TrainConfig: f"the {CNN}", FinetuneConfig: f"--arch {args.arch}", DetectConfig: "--task detect"}[cls]
        raise FerryError(f"{', '.join('--' + n.replace('_', '-') for n in wrong)} {'does' if len(wrong) == 1 else 'do'} "
                         f"not apply to {kind}")
    if cls is DetectConfig and args.arch == CNN:
        raise FerryError(f"--task detect trains a detector; {CNN} is a classifier (use fcos_small or a torchvision detector)")
    given = {n: getattr(args, n) for n in names - {"arch"} if hasattr(args, n)}
    if "channels" in given:
        given["channels"] = tuple(given["channels"])
    if cls is not TrainConfig and args.arch:
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
    check_out(cfg.out, resume=args.resume, overwrite=args.overwrite)
    try:
        if getattr(args, "task", "classify") == "detect":
            from ferry.train.detect import train_detector

            metrics = train_detector(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
            print(f"val_map={metrics['val_map']:.4f} val_map50={metrics['val_map50']:.4f}")
        elif args.arch == CNN:
            from ferry.train.trainer import train

            metrics = train(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
            print(f"test_accuracy={metrics['test_accuracy']:.4f}")
        else:
            from ferry.train.finetune import finetune

            metrics = finetune(cfg, resume=args.resume, progress=not args.quiet, dry_run=args.dry_run)
            print(f"top1={metrics['top1']:.4f}")
    except KeyboardInterrupt:
        print(f"\nferry train: interrupted; the last completed epoch is saved in {cfg.out}. "
              f"Continue with: ferry train --resume{' --task detect' if args.task == 'detect' else ''} --arch {cfg_arch(cfg)} "
              f"--out {cfg.out} --data-dir {cfg.data_dir}" + (f" --annotations {cfg.annotations}" if args.task == "detect" else ""),
              file=sys.stderr)
        return 130
    return 0


def check_out(out: str, *, resume: bool, overwrite: bool) -> None:
    """Before any training: --out is (or can be made) a folder this process can write, and a trained model already
    there is replaced only when asked (--overwrite), continued with --resume, and never by accident."""
    from ferry.core.fileio import check_folder_writable

    check_folder_writable(out, "--out")  # created by the run, not here: a run that fails early leaves nothing
    if resume and overwrite:
        raise FerryError("--resume continues the model in --out and --overwrite replaces it: choose one")
    if not resume and not overwrite and os.path.lexists(os.path.join(out, "checkpoint.pt")):
        raise FerryError(f"--out {out} already holds a trained model (checkpoint.pt): choose another --out, "
                         f"--resume to continue it, or --overwrite to replace it")


def cfg_arch(cfg) -> str:
    return getattr(cfg, "arch", CNN)
