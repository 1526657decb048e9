"""Fixtures for the pytest-benchmark suite (`pytest benchmarks/`; not part of `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """$FERRY_MODELS_DIR (a `make demo` models folder) or a random-weight set built once."""
    env = os.environ.get("FERRY_MODELS_DIR")
    if env:
        return Path(env)
    from ferry.bench.modelset import build_random_models

    return build_random_models(tmp_path_factory.mktemp("bench"))
