"""The runtime's engines: OpenVINO beside onnxruntime on the same files, precision read back and
chosen knowingly (bf16 only where the CPU has it and export validated it), and `auto`, which
measures once per model and CPU and then reads its cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ferry.core.errors import FerryError
from ferry.runtime import auto, contract
from ferry.runtime.classifier import Classifier
from ferry.runtime.providers import ProviderError
from tests.conftest import assert_clean_error, run_ferry, run_in_threads, synthetic_digits

pytest.importorskip("openvino")


def _digits(n: int = 16) -> np.ndarray:
    x, _ = synthetic_digits(n, seed=7)
    return x


def test_openvino_runs_the_same_files_and_reads_back_its_precision(cnn_export, resnet_export):
    path, _ = cnn_export
    ov, ort = Classifier.from_onnx(path, provider="openvino"), Classifier.from_onnx(path, provider="cpu")
    assert ov.provider.engine == "openvino" and ov.provider.used == "OpenVINO:CPU" and ov.session is None
    assert ov.provider.precision == "fp32" and "inference precision fp32 (read back)" in ov.provider.note
    assert ov.provider.threads >= 1 and ort.provider.precision == "fp32"
    batch = np.stack([ort.prepare(d) for d in _digits()])
    np.testing.assert_allclose(ov.run(batch), ort.run(batch), atol=1e-4)
    assert [p.index for p in ov.predictions(ov.run(batch))] == [p.index for p in ort.predictions(ort.run(batch))]
    int8 = Classifier.from_onnx(resnet_export.paths["int8"], provider="openvino")
    assert int8.provider.precision == "int8"
    assert int8.run(np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 1000)


def test_one_openvino_classifier_shared_by_eight_threads(cnn_export):
    """Each call takes its own infer request: 8 threads, different inputs, the single-thread answers."""
    clf = Classifier.from_onnx(cnn_export[0], provider="openvino")
    digits = _digits(64)
    expected = [clf.predict(d).probability for d in digits]
    got: dict[int, list[float]] = {}

    def work(t: int) -> None:
        got[t] = [clf.predict(digits[(i + 8 * t) % 64]).probability for i in range(64)]

    run_in_threads(work, 8)
    for t in range(8):
        assert got[t] == pytest.approx([expected[(i + 8 * t) % 64] for i in range(64)], abs=1e-6)


def test_bf16_is_never_run_unless_the_cpu_has_it_and_export_validated_it(cnn_export, tmp_path, monkeypatch):
    from ferry.runtime import openvino_engine as ove

    path, _ = cnn_export
    meta = contract.read(path)
    # on a CPU without bf16 (the capabilities OpenVINO reports), it is not offered, and says why
    ok, why = ove.bf16_status(meta, capabilities=["FP32", "INT8"])
    assert not ok and "has no bf16 instructions" in why
    # a bf16 CPU, but a model whose bf16 accuracy was not validated at export
    ok, why = ove.bf16_status(meta, capabilities=["FP32", "BF16"])
    assert not ok and "was not validated at export" in why
    validated = meta.replace(info={**meta.info, "precision_checks": {"bf16": {"passed": True}}})
    assert ove.bf16_status(validated, capabilities=["FP32", "BF16"]) == (True, "")
    assert not ove.bf16_status(validated.replace(precision="int8"), capabilities=["BF16"])[0]
    # asked for explicitly where it cannot run: an error naming the reason, never an f32 run
    with pytest.raises(ProviderError, match="openvino-bf16 cannot run"):
        Classifier.from_onnx(path, provider="openvino-bf16")
    # validated on paper and bf16 allowed, but OpenVINO compiles the model at f32 (a plugin that does
    # not take the hint): the read-back refuses it. Simulated on every CPU: a real one without bf16
    # instructions may still compile at bf16 (OpenVINO 2026.4 does on an AVX-512 Ice Lake), so the
    # CPU alone cannot be relied on to show it.
    stamped = tmp_path / "validated.onnx"
    stamped.write_bytes(Path(path).read_bytes())
    contract.write(stamped, validated)
    monkeypatch.setattr(ove, "bf16_status", lambda meta, capabilities=None: (True, ""))
    real = ove.import_openvino()

    class HintIgnored:
        def __init__(self) -> None:
            self._core = real.Core()

        def read_model(self, model):
            return self._core.read_model(model)

        def compile_model(self, model, device, config):
            return self._core.compile_model(model, device, {**config, "INFERENCE_PRECISION_HINT": "f32"})

    monkeypatch.setattr(ove, "import_openvino", lambda: SimpleNamespace(Core=HintIgnored, __version__=real.__version__))
    with pytest.raises(ProviderError, match="compiled the model at fp32, not bf16"):
        Classifier.from_onnx(stamped, provider="openvino-bf16")
    monkeypatch.undo()
    # f32 as asked: read back as fp32
    assert ove.open_openvino(stamped, validated, bf16=False).info.precision == "fp32"


def _bf16_rounded(path):
    """A stand-in bf16 engine: onnxruntime's fp32 logits with bf16's 8-bit mantissa (truncated)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    class Fake:
        input_name = "input"
        info = None

        def infer(self, x):
            y = session.run(None, {"input": x})[0].astype(np.float32)
            return (y.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

        def close(self):
            pass

    return Fake()


def test_export_gates_bf16_like_int8(cnn_export, tmp_path):
    from ferry.export.evalset import EvalSet
    from ferry.export.variants import check_bf16

    path, _ = cnn_export
    meta = contract.read(path)
    # what the session's export recorded on this machine: measured only where bf16 exists
    bf16 = meta.info["precision_checks"]["bf16"]
    assert bf16["passed"] is False and ("without bf16 instructions" in bf16["why"] or "OpenVINO was not installed" in bf16["why"])
    clf = Classifier.from_onnx(path, provider="cpu")
    x, y = synthetic_digits(300, seed=2)
    prepared = np.stack([clf.prepare(d) for d in x])
    labelled = EvalSet("300 synthetic digits", prepared, y)
    kwargs = dict(evaluation=labelled, eval_batches=[prepared[:4]], max_drop_pp=0.1, capabilities=["FP32", "BF16"],
                  log=lambda _m: None)
    ok = check_bf16(Path(path), meta, open_bf16=_bf16_rounded, **kwargs)
    assert ok["passed"] is True and ok["accuracy_vs_fp32"]["images"] == 300 and ok["accuracy_vs_fp32"]["drop_pp"] <= 0.1

    def wrong(p):
        fake = _bf16_rounded(p)
        real = fake.infer
        fake.infer = lambda x: real(x)[:, ::-1].copy()  # a broken bf16 kernel: the classes reversed
        return fake

    bad = check_bf16(Path(path), meta, open_bf16=wrong, **kwargs)
    assert bad["passed"] is False and "missed the gate" in bad["why"] and bad["accuracy_vs_fp32"]["drop_pp"] > 0.1
    none = check_bf16(Path(path), meta, open_bf16=wrong, **{**kwargs, "capabilities": ["FP32"]})
    assert none == {"passed": False, "why": none["why"]} and "without bf16 instructions" in none["why"]


def test_auto_measures_once_then_reads_its_cache(cnn_export, tmp_path, monkeypatch):
    path, _ = cnn_export
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_measure(engines, x, **_):
        calls.append(sorted(engines))
        return {"cpu": 0.002, "openvino": 0.001}  # OpenVINO "faster" here

    monkeypatch.setattr(auto, "measure", fake_measure)
    first = Classifier.from_onnx(path)
    assert first.provider.requested == "auto" and first.provider.engine == "openvino"
    assert "auto: OpenVINO f32, fastest at batch 1 on this CPU" in first.provider.note and "measured now" in first.provider.note
    assert "bf16 not offered" in first.provider.note and calls == [["cpu", "openvino"]]
    cache = tmp_path / "cache" / auto.CACHE_FILE
    (record,) = json.loads(cache.read_text()).values()
    assert record["choice"] == "openvino" and record["median_ms"] == {"cpu": 2.0, "openvino": 1.0}
    again = Classifier.from_onnx(path)
    assert again.provider.engine == "openvino" and "cached choice" in again.provider.note and len(calls) == 1
    # deterministic for a given cache, which a user may edit: it decides, nothing is measured
    data = json.loads(cache.read_text())
    next(iter(data.values()))["choice"] = "cpu"
    cache.write_text(json.dumps(data))
    edited = Classifier.from_onnx(path)
    assert edited.provider.used == "CPUExecutionProvider" and len(calls) == 1
    # an entry damaged by hand (no milliseconds, or text for them) is measured again, not a traceback
    damaged = ({"choice": "cpu"}, {"choice": "cpu", "median_ms": None}, {"choice": "cpu", "median_ms": {"cpu": "fast"}})
    for n, entry in enumerate(damaged, start=2):
        cache.write_text(json.dumps({k: entry for k in data}))
        remeasured = Classifier.from_onnx(path)
        assert remeasured.provider.engine == "openvino" and "measured now" in remeasured.provider.note and len(calls) == n
    # an explicit provider overrides the choice
    assert Classifier.from_onnx(path, provider="openvino").provider.engine == "openvino"
    # a real measurement, once: every candidate timed, the choice among them
    monkeypatch.undo()
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache2"))
    real = Classifier.from_onnx(path)
    (record,) = json.loads((tmp_path / "cache2" / auto.CACHE_FILE).read_text()).values()
    assert set(record["median_ms"]) == {"cpu", "openvino"} and record["choice"] == auto.pick(record["median_ms"])
    assert real.provider.engine == ("openvino" if record["choice"] == "openvino" else "onnxruntime")


def test_auto_keeps_onnxruntime_unless_another_engine_is_clearly_faster():
    """A gap the start-up rounds cannot resolve (within TIE) keeps onnxruntime; a clear one picks the
    faster engine, whichever it is."""
    assert auto.pick({"cpu": 42.365, "openvino": 42.279}) == "cpu"  # 0.2%: the gap that once chose the slower
    assert auto.pick({"cpu": 1.0, "openvino": 0.98, "openvino-bf16": 0.975}) == "cpu"
    assert auto.pick({"cpu": 1.0, "openvino": 0.96}) == "openvino"
    assert auto.pick({"cpu": 1.0, "openvino": 0.9, "openvino-bf16": 0.5}) == "openvino-bf16"
    assert auto.pick({"cpu": 0.5, "openvino": 1.0}) == "cpu"
    assert auto.pick({"openvino": 1.0, "openvino-bf16": 0.99}) == "openvino-bf16"  # no onnxruntime: the lowest


def test_without_openvino_nothing_breaks_and_asking_for_it_says_how(cnn_export, tmp_path):
    """A fake `openvino` that fails to import, first on the path: auto uses onnxruntime and says why;
    --provider openvino is one line with the install command, exit code 2."""
    blocker = tmp_path / "block" / "openvino"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = {"PYTHONPATH": str(tmp_path / "block")}
    digit = tmp_path / "d.png"
    from PIL import Image

    Image.fromarray(_digits(1)[0]).save(digit)
    proc = run_ferry("predict", str(cnn_export[0]), str(digit), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "OpenVINO not installed (pip install 'ferry[openvino]'" in proc.stdout
    assert_clean_error(run_ferry("predict", str(cnn_export[0]), str(digit), "--provider", "openvino", env=env),
                       "pip install 'ferry[openvino]'")


def test_unknown_provider_lists_the_engines(cnn_export):
    with pytest.raises(FerryError, match="choose one of auto, cpu, cuda, tensorrt, openvino, openvino-bf16"):
        Classifier.from_onnx(cnn_export[0], provider="rocm")


def test_the_auto_cache_tells_apart_cpus_that_share_a_class_and_a_name(cnn_export, monkeypatch):
    """A VM's CPU name may be the same on two generations, and one class (avx512_vnni) holds CPUs with
    and without bf16: a choice measured on one must not be read on the other."""
    from ferry.core import machine

    path = cnn_export[0]
    ice_lake = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"]
    monkeypatch.setattr(machine, "cpu_model", lambda cpuinfo=None: "Intel(R) Xeon(R) Processor")
    monkeypatch.setattr(machine, "cpu_id", lambda cpuinfo=None: "GenuineIntel family 6 model 106")
    monkeypatch.setattr(machine, "cpu_flags", lambda cpuinfo=None: ice_lake)
    first = auto.cache_key(path, 2)
    assert auto.cache_key(path, 2) == first and machine.cpu_class() == "avx512_vnni"
    assert auto.cache_key(path, 1) != first
    monkeypatch.setattr(machine, "cpu_flags", lambda cpuinfo=None: [*ice_lake, "avx512_bf16"])
    with_bf16 = auto.cache_key(path, 2)
    assert machine.cpu_class() == "avx512_vnni" and with_bf16 != first
    monkeypatch.setattr(machine, "cpu_id", lambda cpuinfo=None: "GenuineIntel family 6 model 143")
    assert auto.cache_key(path, 2) not in (first, with_bf16)


def test_the_bf16_measurement_compares_what_openvino_compiled(cnn_export, tmp_path):
    """`python -m ferry.bench.openvino_bf16`: f32 against bf16 as OpenVINO compiles them on this CPU
    (with or without bf16 instructions), each read back, or why there is nothing to compare."""
    from ferry.bench import openvino_bf16

    models = tmp_path / "models"
    models.mkdir()
    (models / "mnist-cnn.onnx").write_bytes(Path(cnn_export[0]).read_bytes())
    out = tmp_path / "bf16.json"
    assert openvino_bf16.main(["--models-dir", str(models), "--out", str(out), "--max-seconds", "1"]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "mnist-cnn" and row["f32_read_back"] == "fp32"
    if row["bf16_read_back"] is None:
        assert "not bf16" in row["why"]
    else:
        assert row["bf16_read_back"] == "bf16" and row["f32_p50_ms"] > 0 and row["bf16_p50_ms"] > 0
        lo, hi = row["bf16_over_f32_ci"]
        assert lo <= row["bf16_over_f32"] <= hi and row["rounds"] >= 8 and isinstance(row["top1_same"], bool)
    assert "FP32" in result["openvino_capabilities"] and result["machine"]["cpu_class"]
    assert openvino_bf16.main(["--models-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
