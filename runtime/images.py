"""Safe image decoding: every problem becomes an ImageError naming the file and what is wrong."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ferry.core.errors import FerryError

MIN_SIDE = 8  # smaller images carry no usable content (a 1x1 image is an error, not a guess)


class ImageError(FerryError):
    """An input image that cannot be used."""


def check_image(img: Image.Image, name: str = "image") -> Image.Image:
    if getattr(img, "n_frames", 1) > 1:
        raise ImageError(f"{name}: animated image with {img.n_frames} frames; pass a single still image")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} pixels are needed")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; raise ImageError for anything unusable."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a folder")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_image(img, name)
                img.load()
                return img.copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image Pillow can read") from exc
    except OSError as exc:
        raise ImageError(f"{name}: damaged or truncated image ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise assorted errors on bad data
        raise ImageError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from exc
