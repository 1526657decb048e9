"""A user's folder of images, one subfolder per class: `DATA/<class>/*` or `DATA/train/<class>`
plus `DATA/val/<class>`. Class names come from the folder names (sorted); without a `val/` folder a
fixed, stratified share of each class is held out. Every file is decoded once while scanning (with
the runtime's safe decoder): unreadable ones are skipped and named, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.runtime.images import IMAGE_SUFFIXES, load_image

SPLIT_SEED = 20240531  # the held-out split does not depend on --seed, so runs are comparable


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data folder, with '/' separators
    label: int


@dataclass
class FolderData:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    val_source: str  # how the held-out split was made
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def balance(self) -> dict[str, dict[str, int]]:
        out = {c: {"train": 0, "val": 0} for c in self.classes}
        for part, samples in (("train", self.train), ("val", self.val)):
            for s in samples:
                out[self.classes[s.label]][part] += 1
        return out

    def summary(self) -> str:
        counts = [b["train"] + b["val"] for b in self.balance().values()]
        text = (f"{len(self.train) + len(self.val)} images in {len(self.classes)} classes ({len(self.train)} train, "
                f"{len(self.val)} held out: {self.val_source}); per class {min(counts)} to {max(counts)}")
        if self.skipped:
            names = ", ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            text += f"; skipped {len(self.skipped)} unreadable file(s): {names}{' ...' if len(self.skipped) > 5 else ''}"
        return text


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _check(root: Path, files: list[Path], workers: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """Decode every file once (threads: Pillow releases the GIL while decoding)."""
    def ok(p: Path) -> str | None:
        try:
            load_image(p)
        except FerryError as exc:
            return str(exc).split(": ", 1)[-1]
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(ok, files))
    good = [p for p, why in zip(files, problems) if why is None]
    bad = [(p.relative_to(root).as_posix(), why) for p, why in zip(files, problems) if why is not None]
    return good, bad


def scan(root: str | Path, *, val_fraction: float = 0.1, workers: int = 4,
         progress: Callable[[str], None] = lambda _m: None) -> FolderData:
    root = Path(root)
    if not root.is_dir():
        raise FerryError(f"--data-dir {root} is not a folder (expected DATA/<class>/*.jpg or DATA/train/<class>/ and DATA/val/<class>/)")
    split_dirs = (root / "train").is_dir() and (root / "val").is_dir()
    train_root = root / "train" if split_dirs else root
    classes = [d.name for d in _class_dirs(train_root)]
    if not classes:
        raise FerryError(f"{train_root} has no class folders: put each class's images in a subfolder (DATA/<class>/*.jpg)")
    if len(classes) < 2:
        raise FerryError(f"{train_root} has one class folder ({classes[0]}); a classifier needs at least 2 classes")
    if split_dirs:
        extra = sorted({d.name for d in _class_dirs(root / "val")} - set(classes))
        if extra:
            raise FerryError(f"{root / 'val'} has class folders that train/ lacks: {', '.join(extra)}")
    progress(f"checking the images in {root} ...")
    skipped: list[tuple[str, str]] = []
    per_class: dict[str, list[Path]] = {}
    val_per_class: dict[str, list[Path]] = {}
    for c in classes:
        good, bad = _check(root, _files(train_root / c), workers)
        per_class[c] = good
        skipped += bad
        if split_dirs:
            vgood, vbad = _check(root, _files(root / "val" / c) if (root / "val" / c).is_dir() else [], workers)
            val_per_class[c] = vgood
            skipped += vbad
    if not any(per_class.values()):
        raise FerryError(f"{root} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                         + (f"; {len(skipped)} unreadable" if skipped else ""))
    empty = [c for c, files in per_class.items() if not files]
    if empty:
        raise FerryError(f"class folder(s) with no readable images: {', '.join(empty)} (each class needs images)")

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    train, val = [], []
    if split_dirs:
        for label, c in enumerate(classes):
            train += [Sample(rel(p), label) for p in per_class[c]]
            val += [Sample(rel(p), label) for p in val_per_class[c]]
        source = "the val/ folder"
    else:
        if not 0 < val_fraction < 1:
            raise FerryError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
        rng = np.random.default_rng(SPLIT_SEED)
        for label, c in enumerate(classes):
            files = per_class[c]
            order = rng.permutation(len(files))
            n_val = int(round(val_fraction * len(files))) if len(files) > 1 else 0
            n_val = max(1, n_val) if len(files) > 1 else 0
            held = {int(i) for i in order[:n_val]}
            train += [Sample(rel(p), label) for i, p in enumerate(files) if i not in held]
            val += [Sample(rel(p), label) for i, p in enumerate(files) if i in held]
        source = f"{val_fraction:.0%} of each class, fixed split (seed {SPLIT_SEED})"
    if not val:
        raise FerryError(f"{root}: no images left to hold out for validation (add images, or a val/ folder)")
    return FolderData(root, classes, train, val, source, skipped)


def from_checkpoint(root: str | Path, classes: list[str], val_files: list[tuple[str, int]]) -> FolderData:
    """The split a checkpoint was trained on, found again in its data folder: its held-out files
    exactly, and every other readable image of its classes for training (int8 calibration)."""
    root = Path(root)
    if not root.is_dir():
        raise FerryError(f"the checkpoint's data folder {root} is not there; pass --data-dir with the same images")
    train_root = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
    held = {f for f, _ in val_files}
    missing = [f for f in sorted(held) if not (root / f).is_file()]
    if missing:
        raise FerryError(f"{len(missing)} held-out image(s) of the checkpoint are missing from {root} (e.g. {missing[0]})")
    val = [Sample(f, int(label)) for f, label in val_files]
    train = [Sample(p.relative_to(root).as_posix(), label) for label, c in enumerate(classes)
             if (train_root / c).is_dir() for p in _files(train_root / c) if p.relative_to(root).as_posix() not in held]
    return FolderData(root, classes, train, val, "as recorded in the checkpoint")


def info(data: FolderData) -> dict[str, Any]:
    return {"root": str(data.root), "classes": data.classes, "train_images": len(data.train),
            "val_images": len(data.val), "val_source": data.val_source, "balance": data.balance(),
            "skipped": [{"path": p, "reason": why} for p, why in data.skipped]}
