"""The one place for preprocessing: constants, the metadata spec and the image transforms
(numpy + pillow only).

Training (`train/`) normalizes with the MNIST constants below; export writes `mnist_spec()`,
`imagenet_spec()` or, for a detector, `letterbox_spec()` into the model's ONNX metadata; the runtime
and the benchmarks call `preprocess(image, spec)` (a detector: `preprocess_letterbox`, which also
says where the image went, so boxes map back to its pixels). So a model is always fed what it was
trained on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ferry.core.errors import FerryError

# MNIST: mean and standard deviation of the training pixels scaled to [0, 1].
MNIST_MEAN: float = 0.1307
MNIST_STD: float = 0.3081
MNIST_SIZE: int = 28
MNIST_BOX: int = 20  # MNIST digits were scaled into a 20x20 box, then centred by mass in 28x28
MNIST_LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class EmptyImageError(FerryError):
    """The image holds no ink (a blank canvas, a single dot): there is no digit to classify."""


BLANK = "no digit found: the image is blank (draw a digit)"


class SpecError(FerryError):
    """A preprocessing spec that cannot be used; `field` names the bad field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"preprocessing field {field!r} {problem}")
        self.field, self.problem = field, problem


INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}
KINDS = ("mnist", "imagenet", "letterbox")
DIGIT_NORMALIZATION = {
    "applies_to": "any image that is not already a 28x28 light-on-dark digit",
    "steps": ["grayscale", "invert dark-on-light", "crop to ink", f"fit {MNIST_BOX}x{MNIST_BOX} keeping aspect",
              "centre by mass in 28x28"],
}


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is prepared, stored in its metadata (`preprocess`).

    `mnist`: the digit CNN's MNIST-style normalization to (1, 28, 28). `imagenet`: torchvision's
    ImageClassification preset (resize the shorter side to `resize`, centre-crop `crop`), to
    (3, H, W). `letterbox` (detectors): the whole image scaled to fit `size` keeping its aspect
    ratio (enlarged too only with `upscale`), placed at the top left and padded with the mean
    colour, to (3, H, W). All scale pixels by 1/255, then subtract `mean` and divide by `std` per
    channel (the padding is then exactly 0)."""

    kind: str  # mnist | imagenet | letterbox
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int] | None = None  # mnist: (28, 28); letterbox: (H, W) of the model's input
    resize: int | None = None  # imagenet: the shorter side after resizing
    crop: tuple[int, int] | None = None  # imagenet: (H, W) of the centre crop
    interpolation: str | None = None  # imagenet, letterbox: nearest | bilinear | bicubic
    upscale: bool | None = None  # letterbox: whether images smaller than `size` are enlarged to fit it
    layout: str = "NCHW"
    scale: str = "1/255"

    @property
    def color(self) -> str:
        return "L" if self.kind == "mnist" else "RGB"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        if self.kind == "mnist":
            return (1, *self.size)
        return (3, *(self.size if self.kind == "letterbox" else self.crop))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "layout": self.layout, "color": self.color, "scale": self.scale,
                             "mean": list(self.mean), "std": list(self.std)}
        if self.kind == "mnist":
            d.update(size=list(self.size), digit_normalization=DIGIT_NORMALIZATION)
        elif self.kind == "letterbox":
            d.update(size=list(self.size), interpolation=self.interpolation, upscale=self.upscale,
                     placement="top-left", pad="mean")
        else:
            d.update(resize=self.resize, crop=list(self.crop), interpolation=self.interpolation)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        """Checked field by field: a SpecError names the first bad one."""
        if not isinstance(d, dict):
            raise SpecError("", f"must be an object (got {type(d).__name__})")

        def get(key: str, default: Any = ...) -> Any:
            if key not in d:
                if default is ...:
                    raise SpecError(key, "is missing")
                return default
            return d[key]

        kind = get("kind")
        if kind not in KINDS:
            raise SpecError("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
        if get("layout", "NCHW") != "NCHW":
            raise SpecError("layout", f"must be NCHW (got {d['layout']!r})")
        if get("scale", "1/255") != "1/255":
            raise SpecError("scale", f"must be 1/255 (got {d['scale']!r})")
        channels = 1 if kind == "mnist" else 3
        color = "L" if kind == "mnist" else "RGB"
        if get("color", color) != color:
            raise SpecError("color", f"must be {color} for kind {kind} (got {d['color']!r})")
        mean, std = _numbers(get("mean"), "mean", channels), _numbers(get("std"), "std", channels)
        if min(std) <= 0:
            raise SpecError("std", f"must be positive (got {list(std)})")
        if kind == "mnist":
            size = _ints(get("size"), "size", 2)
            if size != (MNIST_SIZE, MNIST_SIZE):
                raise SpecError("size", f"must be [{MNIST_SIZE}, {MNIST_SIZE}] (got {list(size)})")
            return cls("mnist", mean, std, size=size)
        if kind == "letterbox":
            size = _ints(get("size"), "size", 2)
            if min(size) < 16 or max(size) > 4096:
                raise SpecError("size", f"must be 2 sides from 16 to 4096 (got {list(size)})")
            interpolation = get("interpolation")
            if interpolation not in INTERPOLATIONS:
                raise SpecError("interpolation", f"must be one of {', '.join(INTERPOLATIONS)} (got {interpolation!r})")
            upscale = get("upscale")
            if not isinstance(upscale, bool):
                raise SpecError("upscale", f"must be true or false (got {upscale!r})")
            for key, want in (("placement", "top-left"), ("pad", "mean")):
                if get(key, want) != want:
                    raise SpecError(key, f"must be {want} (got {d[key]!r})")
            return cls("letterbox", mean, std, size=size, interpolation=interpolation, upscale=upscale)
        resize = _ints([get("resize")], "resize", 1)[0]
        crop = _ints(get("crop"), "crop", 2)
        if max(crop) > resize:
            raise SpecError("crop", f"{list(crop)} is larger than the resized shorter side {resize}")
        interpolation = get("interpolation")
        if interpolation not in INTERPOLATIONS:
            raise SpecError("interpolation", f"must be one of {', '.join(INTERPOLATIONS)} (got {interpolation!r})")
        return cls("imagenet", mean, std, resize=resize, crop=crop, interpolation=interpolation)


def _numbers(value: Any, key: str, n: int) -> tuple[float, ...]:
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise SpecError(key, f"must be a list of {n} number(s) (got {value!r})"[:160])
    return tuple(float(v) for v in value)


def _ints(value: Any, key: str, n: int) -> tuple[int, ...]:
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        shown = value[0] if key == "resize" and isinstance(value, list) else value
        raise SpecError(key, f"must be {'a positive integer' if n == 1 else f'{n} positive integers'} (got {shown!r})"[:160])
    return tuple(value)


def mnist_spec() -> Preprocess:
    """Preprocessing of the digit CNN, as stored in the ONNX metadata."""
    return Preprocess("mnist", (MNIST_MEAN,), (MNIST_STD,), size=(MNIST_SIZE, MNIST_SIZE))


def imagenet_spec(*, resize: int = 256, crop: int = 224, interpolation: str = "bilinear",
                  mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Preprocess:
    """Preprocessing of a torchvision classifier (ImageNet-pretrained or fine-tuned from one), as
    stored in the ONNX metadata: torchvision's ImageClassification preset (resize the shorter
    side, centre crop, scale, normalize). Checked like a model file's."""
    if interpolation not in INTERPOLATIONS:
        raise FerryError(f"interpolation {interpolation!r} is not supported; choose one of {', '.join(INTERPOLATIONS)}")
    return Preprocess.from_dict({"kind": "imagenet", "resize": resize, "crop": [crop, crop], "interpolation": interpolation,
                                 "mean": list(mean), "std": list(std)})


def letterbox_spec(*, size: int | tuple[int, int], upscale: bool = False, interpolation: str = "bilinear",
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Preprocess:
    """Preprocessing of a detector, as stored in the ONNX metadata: letterbox into `size` (one side,
    or (H, W)), checked like a model file's."""
    hw = [size, size] if isinstance(size, int) else list(size)
    return Preprocess.from_dict({"kind": "letterbox", "size": hw, "interpolation": interpolation, "upscale": upscale,
                                 "mean": list(mean), "std": list(std)})


# --- decoding helpers -----------------------------------------------------------------------

def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (how it looks on a page)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """I;16 / I / F images: scale their actual range to 0-255 (PIL's convert would clip)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        maxval = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        arr = arr / maxval * 255.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_8bit(img)
    img = _flatten_alpha(img)
    return img.convert("RGB")


def to_gray(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit grayscale (L)."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_8bit(img)
    return _flatten_alpha(img).convert("L")


# --- ImageNet -------------------------------------------------------------------------------

def preprocess_imagenet(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """Return a (3, crop, crop) float32 array, equal to torchvision's ImageClassification preset
    on the same PIL image: resize the shorter side (bilinear, antialiased), centre crop, /255,
    normalize."""
    img = to_rgb(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    size = spec.resize
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    ch, cw = spec.crop
    if new_w < cw or new_h < ch:
        raise FerryError(f"image resized to {new_w}x{new_h} is smaller than the {cw}x{ch} crop")
    top = int(round((new_h - ch) / 2.0))
    left = int(round((new_w - cw) / 2.0))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), INTERPOLATIONS[spec.interpolation])
    img = img.crop((left, top, left + cw, top + ch))
    out = np.empty((3, ch, cw), np.float32)
    _normalize_into(out, img, spec.mean, spec.std)
    return out


def _normalize_into(out: np.ndarray, img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Fill `out` ((3, H, W) float32, a view is fine) from an RGB image of (W, H) pixels with
    torchvision's float32 operations in its order: x / 255, then (x - mean) / std per channel. The
    same IEEE operations give the same values bit for bit."""
    for c, band in enumerate(img.split()):
        np.copyto(out[c], np.asarray(band))  # uint8 -> float32: exact
    out /= np.float32(255)
    out -= np.asarray(mean, np.float32)[:, None, None]
    out /= np.asarray(std, np.float32)[:, None, None]


# --- letterbox (detectors) ------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Where an original image went in a detector's letterboxed input: its size, and the input
    pixels per original pixel along each axis (placed at the top left)."""

    width: int
    height: int
    scale_x: float
    scale_y: float

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(K, 4) x1, y1, x2, y2 boxes in input pixels -> the original image's pixels, clipped to it."""
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / [self.scale_x, self.scale_y, self.scale_x, self.scale_y]
        np.clip(out[:, 0::2], 0, self.width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.height, out=out[:, 1::2])
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(K, 4) boxes in the original image's pixels -> input pixels."""
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [self.scale_x, self.scale_y, self.scale_x, self.scale_y]


def letterbox_size(width: int, height: int, spec: Preprocess) -> tuple[int, int]:
    """(width, height) of the image once scaled to fit the input (never enlarged without `upscale`)."""
    h_max, w_max = spec.size
    scale = min(w_max / width, h_max / height)
    if not spec.upscale:
        scale = min(scale, 1.0)
    return max(1, min(w_max, round(width * scale))), max(1, min(h_max, round(height * scale)))


def preprocess_letterbox(img: Image.Image, spec: Preprocess) -> tuple[np.ndarray, Frame]:
    """A (3, H, W) float32 detector input and the Frame that maps its boxes back to `img`: the image
    scaled to fit (`letterbox_size`), at the top left, the rest padded with the mean colour (0 once
    normalized), every pixel /255 then normalized."""
    img = to_rgb(img)
    w, h = img.size
    new_w, new_h = letterbox_size(w, h, spec)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), INTERPOLATIONS[spec.interpolation])
    out = np.zeros((3, *spec.size), np.float32)
    _normalize_into(out[:, :new_h, :new_w], img, spec.mean, spec.std)
    return out, Frame(w, h, new_w / w, new_h / h)


# --- digits ---------------------------------------------------------------------------------

def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _is_mnist_like(gray: np.ndarray) -> bool:
    """A 28x28 image with a dark border is taken as an MNIST digit and passes straight through."""
    if gray.shape != (MNIST_SIZE, MNIST_SIZE):
        return False
    border = float(gray[0].sum()) + float(gray[-1].sum()) + float(gray[:, 0].sum()) + float(gray[:, -1].sum())
    return border / (4 * MNIST_SIZE) < 0.25


def normalize_digit(image: Image.Image | np.ndarray) -> np.ndarray:
    """MNIST-style normalization of an arbitrary digit image -> (28, 28) float32 in [0, 1],
    light digit on a dark background.

    A 28x28 light-on-dark image passes straight through. Anything else (a photo or scan of a
    digit, a canvas drawing) is converted to grayscale, inverted when its background is light,
    cropped to the ink, scaled to fit 20x20 keeping its aspect ratio and placed in 28x28 with its
    centre of mass at the centre, as the MNIST digits were. Raises EmptyImageError without ink.
    """
    if isinstance(image, Image.Image):
        gray = np.asarray(to_gray(image), dtype=np.float32) / 255.0
    else:
        gray = np.asarray(image, dtype=np.float32)
        if gray.ndim != 2:
            raise FerryError(f"a digit array must be 2-D (H, W); got shape {gray.shape}")
        if not np.isfinite(gray).all():
            raise FerryError("digit array contains NaN or infinite values")
        if gray.max(initial=0) > 1.0:
            gray = gray / 255.0
    return normalize_unit_digit(gray)


def normalize_unit_digit(gray: np.ndarray) -> np.ndarray:
    """`normalize_digit` of a checked 2-D float32 array in [0, 1] (the runtime's array path)."""
    if _is_mnist_like(gray):
        if float(gray.max(initial=0)) < 0.1:  # a dark square with no digit in it
            raise EmptyImageError(BLANK)
        return np.ascontiguousarray(gray, dtype=np.float32)

    if float(np.median(_border(gray))) > 0.5:  # dark ink on a light page
        gray = 1.0 - gray
    # Remove the background level and stretch the ink to [0, 1].
    gray = np.clip(gray - float(np.median(_border(gray))), 0, None)
    peak = float(gray.max(initial=0))
    if peak < 0.1:
        raise EmptyImageError(BLANK)
    gray = gray / peak
    ink = gray > 0.2
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if max(rows.size, cols.size) < max(3, 0.08 * max(gray.shape)):
        raise EmptyImageError("no digit found: only a dot (draw a digit)")
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    box = np.asarray(Image.fromarray(crop, mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS))
    box = np.clip(box, 0.0, 1.0)

    total = float(box.sum())
    ys, xs = np.indices(box.shape)
    cy, cx = float((ys * box).sum()) / total, float((xs * box).sum()) / total
    top = int(round(MNIST_SIZE / 2 - 0.5 - cy))
    left = int(round(MNIST_SIZE / 2 - 0.5 - cx))
    # keep the whole box on the canvas
    top = min(max(top, 0), MNIST_SIZE - new_h)
    left = min(max(left, 0), MNIST_SIZE - new_w)
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = box
    return out


def preprocess_mnist(image: Image.Image | np.ndarray, spec: Preprocess) -> np.ndarray:
    """(1, 28, 28) float32 input for the digit CNN."""
    return standardize_digit(normalize_digit(image), spec)


def mnist_uint8_passthrough(arr: np.ndarray, spec: Preprocess) -> np.ndarray | None:
    """A (28, 28) uint8 digit that is already MNIST-like (a dark border: the passthrough case of
    `normalize_digit`) -> its (1, 28, 28) model input by one lookup, bit for bit what the float path
    computes; None for any other image (the caller takes the general path)."""
    # the four edges' sum (corners twice, as `_is_mnist_like` counts them) over the bytes, in C order
    # whatever the array's strides: no numpy reduction, whose call costs more than this whole check
    raw, n = arr.tobytes(), MNIST_SIZE
    top, bottom, left, right = raw[:n], raw[-n:], raw[::n], raw[n - 1::n]
    if not (top == bottom == left == right == _BLANK_EDGE):  # a blank border (most digits) needs no sum
        if sum(top) + sum(bottom) + sum(left) + sum(right) >= 0.25 * 255 * 4 * MNIST_SIZE:
            return None
    if not raw.strip(_FAINT):  # no pixel of 26 or more (scanned in from both ends): `normalize_unit_digit`'s blank
        raise EmptyImageError(BLANK)
    return _digit_lut(spec.mean[0], spec.std[0]).take(arr)[None]


_BLANK_EDGE = bytes(MNIST_SIZE)
_FAINT = bytes(range(26))  # uint8 values under 0.1 x 255: no ink


@functools.lru_cache(maxsize=4)
def _digit_lut(mean: float, std: float) -> np.ndarray:
    """(256,) float32: x / 255 then (x - mean) / std, the same float32 operations in the same order."""
    v = np.arange(256, dtype=np.float32)
    v /= np.float32(255)
    v -= np.float32(mean)
    v /= np.float32(std)
    return v


def standardize_digit(digit: np.ndarray, spec: Preprocess) -> np.ndarray:
    """A normalized (28, 28) digit in [0, 1] -> the model's (1, 28, 28) float32 input."""
    out = np.empty((1, *digit.shape), np.float32)
    np.subtract(digit, np.float32(spec.mean[0]), out=out[0])
    out /= np.float32(spec.std[0])
    return out


def preprocess(image: Image.Image | np.ndarray, spec: Preprocess) -> np.ndarray:
    """Preprocess one image for the model described by `spec` (from the model's metadata)."""
    if spec.kind == "mnist":
        return preprocess_mnist(image, spec)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if spec.kind == "letterbox":
        return preprocess_letterbox(image, spec)[0]
    return preprocess_imagenet(image, spec)
