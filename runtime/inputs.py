"""The user's images, listed and read the same way in every room: `ferry train` and `ferry export`
(a folder of class folders, calibration folders), `ferry predict` and `ferry batch` (files,
folders, lists).

- Listing: a folder's files, recursively, sorted, hidden ones (any part of the path starting with
  '.') left out (`list_files`, `expand_inputs`).
- Reading: the runtime's safe decoder (`images.load_image`). A file that cannot be used is skipped
  and named, with the decoder's reason (`Skipped`, `describe_skipped`): training skips it, export
  skips it (so a folder that trains also exports), predict and batch report it as that input's
  error and go on with the rest.
- Class folders: `DATA/<class>/*` or `DATA/train/<class>` plus `DATA/val/<class>`; class names are
  the folder names (sorted); without a `val/` folder a fixed, stratified share of each class is
  held out (`scan_class_folders`), and an exported checkpoint finds its split again
  (`from_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FerryError
from ferry.runtime.images import load_image

SPLIT_SEED = 20240531  # the held-out split does not depend on any training seed, so runs are comparable


# --- listing -----------------------------------------------------------------------------------


def list_files(folder: str | Path) -> list[Path]:
    """Every file under `folder`, recursively, sorted, hidden ones (any part of the path starting
    with '.') left out. Nothing else is left out silently: a link to nowhere or a FIFO is listed, and
    so is a folder inside that cannot be read or a link to a folder (not followed), so that reading
    the entry names the problem. `folder` itself unreadable is an error: its files are unknown."""
    folder = Path(folder)
    out: list[Path] = []

    def unreadable(exc: OSError) -> None:
        if os.path.abspath(exc.filename or folder) == os.path.abspath(folder):
            raise FerryError(f"cannot read the folder {folder}: {exc.strerror or exc}") from exc
        out.append(Path(exc.filename))  # a folder inside: an entry whose reading says so

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(Path(root) / d for d in dirs if os.path.islink(os.path.join(root, d)))  # not followed: named
        out.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(out)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders expanded to their files (`list_files`). An empty path (an unset
    variable in a script) is an error, not the current folder."""
    out: list[str] = []
    for item in inputs:
        if not str(item):
            raise FerryError("an input path is empty (an unset variable?); give a file, a folder or '.'")
        out.extend(str(f) for f in list_files(item)) if os.path.isdir(item) else out.append(item)
    return out


# --- reading, skipping what cannot be read -------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A file left out because it cannot be used, and why (the decoder's words)."""

    path: str  # as given, or relative to the folder being read
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def describe_skipped(skipped: Sequence[Skipped], *, limit: int = 5) -> str:
    """One line for the log and the metadata: "skipped 2 unreadable file(s): a.png (why), b.txt (why)"."""
    names = ", ".join(str(s) for s in skipped[:limit])
    return f"skipped {len(skipped)} unreadable file(s): {names}{' ...' if len(skipped) > limit else ''}"


def _reason(exc: FerryError) -> str:
    return str(exc).split(": ", 1)[-1]  # the decoder's message starts with the file name


def check_files(files: Sequence[Path], *, root: Path | None = None, workers: int = 4) -> tuple[list[Path], list[Skipped]]:
    """Decode every file once (threads: Pillow releases the GIL while decoding); return the usable
    ones and the skipped ones (paths relative to `root` when given)."""
    def problem(p: Path) -> str | None:
        try:
            load_image(p)
        except FerryError as exc:
            return _reason(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(problem, files))
    good = [p for p, why in zip(files, problems) if why is None]
    skipped = [Skipped(p.relative_to(root).as_posix() if root else str(p), why)
               for p, why in zip(files, problems) if why is not None]
    return good, skipped


def read_images(files: Sequence[Path], prepare: Callable[[Any], np.ndarray], *, root: Path | None = None,
                workers: int = 4) -> tuple[list[np.ndarray], list[int], list[Skipped]]:
    """Decode and prepare each file (`prepare`: a PIL image -> an array). Returns the arrays, the
    indices of the files they came from, and the skipped files."""
    def one(p: Path) -> np.ndarray | str:
        try:
            return prepare(load_image(p))
        except FerryError as exc:
            return _reason(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, files))
    arrays = [r for r in results if not isinstance(r, str)]
    kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
    skipped = [Skipped(files[i].relative_to(root).as_posix() if root else str(files[i]), r)
               for i, r in enumerate(results) if isinstance(r, str)]
    return arrays, kept, skipped


# --- class folders -------------------------------------------------------------------------------


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
    skipped: list[Skipped] = field(default_factory=list)

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
        return f"{text}; {describe_skipped(self.skipped)}" if self.skipped else text

    def info(self) -> dict[str, Any]:
        return {"root": str(self.root), "classes": self.classes, "train_images": len(self.train),
                "val_images": len(self.val), "val_source": self.val_source, "balance": self.balance(),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped]}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def scan_class_folders(root: str | Path, *, val_fraction: float = 0.1, workers: int = 4,
                       progress: Callable[[str], None] = lambda _m: None) -> FolderData:
    """The classes, a train/held-out split and the skipped files of a folder of class folders. Every
    file is decoded once here; one that cannot be is skipped and named."""
    root = Path(root)
    if not root.is_dir():
        raise FerryError(f"--data-dir {root} is not a folder (expected DATA/<class>/*.jpg or DATA/train/<class>/ and DATA/val/<class>/)")
    split_dirs = _has_split_dirs(root)
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
    skipped: list[Skipped] = []
    per_class: dict[str, list[Path]] = {}
    val_per_class: dict[str, list[Path]] = {}
    for c in classes:
        per_class[c], bad = check_files(list_files(train_root / c), root=root, workers=workers)
        skipped += bad
        if split_dirs:
            val_dir = root / "val" / c
            val_per_class[c], bad = check_files(list_files(val_dir) if val_dir.is_dir() else [], root=root, workers=workers)
            skipped += bad
    if not any(per_class.values()):
        raise FerryError(f"{root} holds no readable images" + (f"; {describe_skipped(skipped, limit=3)}" if skipped else ""))
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
            n_val = max(1, int(round(val_fraction * len(files)))) if len(files) > 1 else 0
            held = {int(i) for i in order[:n_val]}
            train += [Sample(rel(p), label) for i, p in enumerate(files) if i not in held]
            val += [Sample(rel(p), label) for i, p in enumerate(files) if i in held]
        source = f"{val_fraction:.0%} of each class, fixed split (seed {SPLIT_SEED})"
    if not val:
        raise FerryError(f"{root}: no images left to hold out for validation (add images, or a val/ folder)")
    return FolderData(root, classes, train, val, source, skipped)


def from_checkpoint(root: str | Path, classes: list[str], val_files: list[tuple[str, int]], *,
                    check: bool = False, workers: int = 4) -> FolderData:
    """The split a checkpoint was trained on, found again in its data folder: its held-out files
    exactly, and every other file of its classes for training. Unless `check`, the training files
    are not decoded here (int8 calibration: the reader that prepares them skips and names what it
    cannot read); with `check` (a resumed training run) they are decoded once and the unreadable
    ones skipped and named, as `scan_class_folders` does, so the run trains on the same files."""
    root = Path(root)
    if not root.is_dir():
        raise FerryError(f"the checkpoint's data folder {root} is not there; pass --data-dir with the same images")
    train_root = root / "train" if _has_split_dirs(root) else root
    held = {f for f, _ in val_files}
    missing = [f for f in sorted(held) if not (root / f).is_file()]
    if missing:
        raise FerryError(f"{len(missing)} held-out image(s) of the checkpoint are missing from {root} (e.g. {missing[0]})")
    val = [Sample(f, int(label)) for f, label in val_files]
    train = [Sample(p.relative_to(root).as_posix(), label) for label, c in enumerate(classes)
             if (train_root / c).is_dir() for p in list_files(train_root / c) if p.relative_to(root).as_posix() not in held]
    skipped: list[Skipped] = []
    if check:
        good, skipped = check_files([root / s.path for s in train], root=root, workers=workers)
        usable = {p.relative_to(root).as_posix() for p in good}
        train = [s for s in train if s.path in usable]
    return FolderData(root, classes, train, val, "as recorded in the checkpoint", skipped)
