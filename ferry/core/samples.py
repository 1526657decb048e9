"""The sample images shipped inside the package (`ferry/samples/`: a few freely licensed photos and
drawn digits; sources and licences in its README.md), so `make demo`, the benchmarks and the tests
find them in a checkout and in an installed wheel alike."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def samples_dir() -> Path:
    """The folder of the shipped samples (`photos/`, `digits/`)."""
    return Path(str(resources.files("ferry").joinpath("samples")))


def sample_photos() -> list[Path]:
    """The sample photos (JPEG), sorted."""
    return sorted((samples_dir() / "photos").glob("*.jpg"))


def sample_digits() -> list[Path]:
    """The sample digits drawn on the canvas (PNG), sorted."""
    return sorted((samples_dir() / "digits").glob("*.png"))
