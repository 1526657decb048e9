"""Safe image decoding: every problem becomes an ImageError naming the file and what is wrong."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ferry.core.errors import FerryError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MIN_SIDE = 8  # smaller images carry no usable content (a 1x1 image is an error, not a guess)


NOT_A_FILE = "not a regular file (a FIFO, a device or a socket)"  # what reading one would wait on, not an image


class ImageError(FerryError):
    """An input image that cannot be used."""


class ImageTooLarge(ImageError):
    """An image whose pixel count is over the decompression-bomb limit (`max_pixels()`)."""


def check_image(img: Image.Image, name: str = "image") -> Image.Image:
    if getattr(img, "n_frames", 1) > 1:
        raise ImageError(f"{name}: animated image with {img.n_frames} frames; pass a single still image")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} pixels are needed")
    return img


def max_pixels() -> int:
    """The decompression-bomb limit: Pillow's MAX_IMAGE_PIXELS (about 89 megapixels unless changed)."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_size(img: Image.Image, name: str) -> None:
    """Refuse an image whose header declares more pixels than `max_pixels()`, before decoding it.

    Pillow only warns between 1x and 2x its limit (and raises above); turning that warning into an
    error with `warnings.catch_warnings()` is process-global and not thread-safe, so the size is
    checked here instead, the same way in every thread."""
    w, h = img.size
    if w * h > max_pixels():
        raise ImageTooLarge(f"{name}: too large to decode safely ({w}x{h} = {w * h:,} pixels; the limit is {max_pixels():,})")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; raise ImageError for anything unusable. Thread-safe."""
    path = Path(path)
    name = str(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:  # a link to nowhere too
        raise ImageError(f"{name}: no such file") from exc
    except PermissionError as exc:  # in a folder that cannot be entered
        raise ImageError(f"{name}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        unreadable = not os.access(path, os.R_OK | os.X_OK)
        raise ImageError(f"{name}: is a folder" + (" that cannot be read (permission denied)" if unreadable else ""))
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would wait for a writer
        raise ImageError(f"{name}: {NOT_A_FILE}")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return _decode(path, name)


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Decode an encoded image held in memory (an HTTP body, a blob read by Ray Data) exactly as
    `load_image` decodes a file; raise ImageError for anything unusable. Thread-safe."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as img:  # reads the header only
            check_size(img, name)
            check_image(img, name)
            img.load()
            return img.copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image Pillow can read") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{name}: damaged or truncated image ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise assorted errors on bad data
        raise ImageError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from exc


def quiet_bomb_warnings() -> None:
    """For applications (the CLI, the server), once at start-up: Pillow's DecompressionBombWarning
    would only repeat what `check_size` reports as an error."""
    import warnings

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
