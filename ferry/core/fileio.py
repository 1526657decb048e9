"""Atomic file writes (write to a temporary file beside the target, then rename over it) and file hashes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ferry.core.errors import FerryError


def written_in_place(target: str | os.PathLike[str]) -> bool:
    """Whether `target` is something a rename must not replace, which is written into instead: a
    device, a FIFO or a socket (/dev/null, a named pipe), or a process's descriptor (/dev/stdout,
    /dev/fd/N, /proc/self/fd/N: redirected to a file, it names that open file, which the shell
    holds). A regular file is replaced whole, wherever it is (/dev/shm too)."""
    path = os.path.abspath(target)
    if os.path.islink(path):
        link = os.path.abspath(os.path.join(os.path.dirname(path), os.readlink(path)))
        if link.startswith("/proc/") or os.path.realpath(os.path.dirname(path)).startswith("/proc/"):
            return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def own_descriptor(target: str | os.PathLike[str]) -> int | None:
    """N when `target` names one of this process's open descriptors (/dev/stdout, /dev/fd/N,
    /proc/self/fd/N, a link to one): written through it, the bytes land where the process's own
    output goes (a file it was redirected to: at its position, after what was printed)."""
    path = os.path.abspath(target)
    mine = (f"/proc/{os.getpid()}/fd", "/proc/self/fd")
    for _ in range(8):
        if os.path.realpath(os.path.dirname(path)) in mine and os.path.basename(path).isdigit():
            return int(os.path.basename(path))
        if not os.path.islink(path):
            return None
        path = os.path.abspath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it over `target`.

    On any exception the temporary file is removed and `target` is left as it was, so a
    reader never sees a half-written file. A symbolic link is followed (the file it names is
    replaced, the link stays); a device or FIFO (`written_in_place`) gets the bytes once they are
    complete, the temporary file then in the temporary folder.
    """
    in_place = written_in_place(target)
    target = Path(os.path.realpath(target)) if os.path.islink(target) and not in_place else Path(target)
    try:
        if not in_place:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=None if in_place else target.parent)
    except OSError as exc:
        raise FerryError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        if in_place:
            for stream in (sys.stdout, sys.stderr):  # what this process printed comes first (/dev/stdout)
                with contextlib.suppress(Exception):
                    stream.flush()
            fd = own_descriptor(target)
            try:
                if fd is not None:  # through the descriptor itself: its position is the one printing moves
                    data = tmp_path.read_bytes()
                    while data:
                        data = data[os.write(fd, data):]
                else:  # a device or a FIFO
                    with open(tmp_path, "rb") as src, open(target, "ab") as dst:
                        shutil.copyfileobj(src, dst)
            except OSError as exc:  # /dev/full, a pipe with no reader, ...
                raise FerryError(f"cannot write {target}: {exc.strerror or exc}") from exc
            tmp_path.unlink()
        else:
            os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.filename in (str(tmp_path), str(target)):  # the rename: a folder there, ...
            raise FerryError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise


def check_input_file(path: str | os.PathLike[str], what: str, name: str) -> None:
    """A path given as `what` (a model, a checkpoint) names a file with something in it; a folder, a
    missing or an empty file is said as such (`name`: what to name in a folder instead). os.path's
    probes answer False where Path's may raise (a folder on the way that cannot be entered)."""
    if os.path.isdir(path):
        raise FerryError(f"{what} {path} is a folder; name the {name} in it")
    if not os.path.isfile(path):
        raise FerryError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise FerryError(f"{what} {path} is an empty file (0 bytes)")


def check_folder_writable(folder: str | os.PathLike[str], flag: str) -> None:
    """Before the work: `folder` is a folder this process can write, or one it can create (the
    nearest folder that exists above it is writable). Creates nothing. os.path's probes answer False
    where Path's may raise (a folder on the way that cannot be entered)."""
    given = os.path.abspath(folder)
    if os.path.lexists(given) and not os.path.isdir(given):  # a file, or a link to nowhere
        raise FerryError(f"{flag} {folder} exists and is not a folder")
    nearest = given
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise FerryError(f"cannot create {flag} {folder}: {nearest} is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise FerryError(f"cannot write to {flag} {folder}: permission denied on {nearest}")


def check_file_writable(target: str | os.PathLike[str], flag: str,
                        keep: Iterable[tuple[str | os.PathLike[str], str]] = ()) -> None:
    """Before the work: `target` can be written as a file. Not a folder, not one of `keep` (pairs of
    a path and what it is, e.g. the command's model and inputs, which a write would destroy), in a
    folder that exists or can be made and that this process can write. Creates nothing."""
    if os.path.isdir(target):
        raise FerryError(f"{flag} {target} is a folder; name a file")
    if written_in_place(target):  # a device or FIFO (/dev/stdout): written into, so it must take writes
        if not os.access(target, os.W_OK):
            raise FerryError(f"cannot write {flag} {target}: permission denied")
        return
    if os.path.islink(target):  # the file it names is written (the link stays)
        target = os.path.realpath(target)
    try:
        st = os.stat(target)
    except OSError:
        st = None  # not there (or not to be looked at): nothing of ours to destroy; the folder check says the rest
    if st is not None:
        for other, what in keep:
            try:
                o = os.stat(other)
            except OSError:
                continue
            if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                raise FerryError(f"{flag} {target} is {what}: writing there would destroy it; name another file")
    check_folder_writable(os.path.dirname(os.path.abspath(target)), f"{flag}'s folder")


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
