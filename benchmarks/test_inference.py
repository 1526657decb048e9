"""pytest-benchmark suite: `pytest benchmarks/ [--benchmark-json out.json]`.

Parametrized by model, backend and batch size; the provider actually used (read back from the
session) goes into `extra_info`. GPU cases skip with the reason on machines without one.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import backends as bk
from benchmarks.suite import BenchConfig, prepare_backend

CASES = [
    (model, backend.name, batch)
    for model, batches in (("mnist-cnn", (1, 64, 256)), ("resnet50", (1, 8)))
    for backend in bk.ALL_BACKENDS
    for batch in batches
]


def _param(model, backend, batch):
    marks = [pytest.mark.gpu] if bk.BACKENDS[backend].device == "cuda" else []
    return pytest.param(model, backend, batch, marks=marks, id=f"{model}-{backend}-b{batch}")


@pytest.mark.parametrize("model,backend,batch", [_param(*c) for c in CASES])
def test_inference(benchmark, models_dir, model, backend, batch):
    spec = bk.BACKENDS[backend]
    cfg = BenchConfig(models_dir=str(models_dir))
    try:
        prepared = prepare_backend(spec, model, cfg)
    except bk.Unavailable as exc:
        pytest.skip(f"{backend}: {exc}")
    shape = (1, 28, 28) if model == "mnist-cnn" else (3, 224, 224)
    x = prepared.to_input(np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32))
    benchmark.extra_info.update(model=model, backend=backend, provider=prepared.provider_used, precision=spec.precision,
                                device=prepared.device_name, batch_size=batch)

    def once():
        prepared.run(x)
        prepared.sync()

    for _ in range(3):  # warm-up outside the timed rounds
        once()
    benchmark(once)
    benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.median
