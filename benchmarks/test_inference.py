"""pytest-benchmark suite: `pytest benchmarks/ [--benchmark-json out.json]`.

Parametrized by model, backend and batch size; the provider actually used (read back from the
session) goes into `extra_info`. GPU cases skip with the reason on machines without one.
"""

from __future__ import annotations

import numpy as np
import pytest

from ferry.bench import backends as bk
from ferry.bench import matrix
from ferry.bench.suite import BenchConfig, prepare_backend

CASES = [
    (model, backend.name, batch)
    for model in matrix.DEFAULT_MODELS
    for backend in matrix.ALL_BACKENDS
    for batch in matrix.batch_sizes(model, "pytest")
]


def _param(model, backend, batch):
    marks = [pytest.mark.gpu] if matrix.BACKENDS[backend].device == "cuda" else []
    return pytest.param(model, backend, batch, marks=marks, id=f"{model}-{backend}-b{batch}")


@pytest.mark.parametrize("model,backend,batch", [_param(*c) for c in CASES])
def test_inference(benchmark, models_dir, model, backend, batch):
    spec = matrix.BACKENDS[backend]
    cfg = BenchConfig(models_dir=str(models_dir))
    try:
        prepared = prepare_backend(spec, model, cfg)
    except bk.Unavailable as exc:
        pytest.skip(f"{backend}: {exc}")
    shape = matrix.input_shape(model, models_dir)
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    benchmark.extra_info.update(model=model, backend=backend, provider=prepared.provider_used, precision=spec.precision,
                                device=prepared.device_name, batch_size=batch)

    def once():
        prepared.run(x)
        prepared.sync()

    for _ in range(3):  # warm-up outside the timed rounds
        once()
    benchmark(once)
    benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.median
