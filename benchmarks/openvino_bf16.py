"""OpenVINO's bf16 precision hint against f32 on this CPU, for the models of `--models-dir`
(`mnist-cnn.onnx`, `resnet50.onnx`): batch-1 latency of each through ferry's OpenVINO engine in
interleaved rounds (the ratio is the median of per-round ratios, with its ~95% interval), the
precision OpenVINO reports it compiled at, and whether both give the same top-1 on the same input.

On a CPU with bf16 instructions (avx512_bf16 or AMX) this is what `ov-cpu-bf16` gains. On one
without them, ferry does not offer bf16 (`--provider openvino-bf16` and `auto` refuse it), yet
OpenVINO may still compile at bf16 when asked and emulate it: this measures what that refusal keeps
a user from. The bf16 side is opened without ferry's gate (`validated=False`), for this measurement
only.

  python -m ferry.bench.openvino_bf16 --models-dir models --out runs/openvino_bf16.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("mnist-cnn", "resnet50")


def compare(path: Path, *, threads: int | None = None, max_seconds: float = 30.0) -> dict[str, Any]:
    """One model: f32 against bf16 through ferry's OpenVINO engine, interleaved, batch 1."""
    from ferry.bench.harness import measure_interleaved, percentile
    from ferry.runtime import contract
    from ferry.runtime.openvino_engine import open_openvino
    from ferry.runtime.providers import ProviderError

    meta = contract.read(path)
    x = np.random.default_rng(0).standard_normal((1, *meta.preprocess.input_shape)).astype(np.float32)
    f32 = open_openvino(path, meta, threads=threads)
    row: dict[str, Any] = {"model": path.stem, "threads": f32.info.threads, "f32_read_back": f32.info.precision}
    try:
        bf16 = open_openvino(path, meta, bf16=True, threads=threads, validated=False)
    except ProviderError as exc:
        f32.close()
        if "not bf16" not in str(exc):  # it could not compile the model at all: a real error
            raise
        return {**row, "bf16_read_back": None, "why": str(exc)}  # compiled at f32 when asked for bf16
    row["bf16_read_back"] = bf16.info.precision
    try:
        a, b = f32.infer(x), bf16.infer(x)
        result = measure_interleaved({"f32": lambda: f32.infer(x), "bf16": lambda: bf16.infer(x)}, batch_size=1,
                                     pairs=[("bf16", "f32")], max_seconds=max_seconds)
    finally:
        f32.close()
        bf16.close()
    ratio, lo, hi = result.ratio("bf16", "f32")
    return {**row, "f32_p50_ms": 1e3 * percentile(result.latencies["f32"], 50),
            "bf16_p50_ms": 1e3 * percentile(result.latencies["bf16"], 50), "bf16_over_f32": ratio,
            "bf16_over_f32_ci": [lo, hi], "rounds": result.rounds, "top1_same": bool(a.argmax() == b.argmax()),
            "max_abs_logit_diff": float(np.abs(a - b).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--out", default="runs/openvino_bf16.json")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="interleaved rounds per model, at most (s)")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import machine_info
    from ferry.runtime.openvino_engine import DEVICE, import_openvino

    try:
        capabilities = list(import_openvino().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    except FerryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = [Path(args.models_dir) / f"{m}.onnx" for m in MODELS]
    if not any(p.is_file() for p in paths):
        print(f"error: neither {' nor '.join(map(str, paths))} exists (make demo writes them)", file=sys.stderr)
        return 2
    machine = machine_info()
    print(f"CPU: {machine.get('cpu')} (class {machine.get('cpu_class')}); OpenVINO's CPU capabilities: "
          f"{', '.join(capabilities)}", flush=True)
    rows, failed = [], 0
    for path in paths:
        if not path.is_file():
            continue
        try:
            row = compare(path, max_seconds=args.max_seconds)
        except FerryError as exc:  # a file OpenVINO cannot read or compile: one line, the others still measured
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        rows.append(row)
        if row["bf16_read_back"] is None:
            print(f"{row['model']}: {row['why']}", flush=True)
        else:
            lo, hi = row["bf16_over_f32_ci"]
            print(f"{row['model']}: f32 {row['f32_p50_ms']:.3f} ms, bf16 (read back: {row['bf16_read_back']}) "
                  f"{row['bf16_p50_ms']:.3f} ms: bf16 takes x{row['bf16_over_f32']:.2f} [{lo:.2f}-{hi:.2f}] the time of f32 "
                  f"({row['rounds']} interleaved rounds); same top-1: {row['top1_same']}", flush=True)
    write_json_atomic(Path(args.out), {"schema": "ferry.openvino-bf16/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "machine": machine, "openvino_capabilities": capabilities,
                                       "bf16_instructions": "BF16" in capabilities, "rows": rows})
    print(f"wrote {args.out}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
