"""Does an int8 model give the same answers on every x86-64 CPU class? Quantizes one fp32 digit CNN
with each of onnxruntime's choices (U8S8, U8S8 with reduce_range, S8S8, U8U8) and measures MNIST
test accuracy on this CPU and, with --emulate, on another CPU model run by QEMU's user-mode
emulator (qemu-x86_64 -cpu MODEL). onnxruntime picks its int8 kernels from CPUID, so under
`-cpu EPYC-Milan` (AMD Zen 3: AVX2, no AVX-512, no VNNI) it runs the same kernels a Zen 3 machine
runs. Emulation reproduces arithmetic, not speed (the emulated run skips the fp32 model: its
convolutions take hours under emulation, and fp32 kernels do not depend on VNNI).

  python -m ferry.bench.int8_portability --model models/mnist-cnn.onnx --data-dir DIR \\
      --emulate EPYC-Milan --out runs/int8_portability.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

EMULATED_CLASSES = {"EPYC-Milan": "avx2 (no VNNI): AMD Zen 3", "EPYC-Rome": "avx2 (no VNNI): AMD Zen 2",
                    "Haswell": "avx2 (no VNNI): Intel Haswell", "Skylake-Server": "avx512 (no VNNI): Intel Skylake-SP"}


def accuracies(models: dict[str, str], data_dir: str, limit: int = 0) -> dict[str, float]:
    """MNIST test accuracy of each model on the CPU this process sees (possibly an emulated one)."""
    from ferry.core.idx import read_mnist
    from ferry.export.digits import prepare_digits
    from ferry.export.onnx_export import cpu_session, run_batched

    x, y = read_mnist(data_dir, "t10k")
    if limit:
        x, y = x[:limit], y[:limit]
    xs = prepare_digits(x)
    return {name: float((run_batched(cpu_session(path), xs).argmax(1) == y).mean()) for name, path in models.items()}


def emulated_logits(model: str, x_path: str, cpu: str) -> np.ndarray:
    """Logits of `model` on the inputs saved at `x_path` (.npy), computed under qemu-x86_64 -cpu CPU."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-x86_64 is not installed (Debian: apt-get install qemu-user)")
    out = x_path + f".{cpu}.logits.npy"
    code = ("import sys, numpy as np; from ferry.export.onnx_export import cpu_session, run_batched; "
            "np.save(sys.argv[3], run_batched(cpu_session(sys.argv[1]), np.load(sys.argv[2])))")
    proc = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", code, model, x_path, out],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the emulated run failed: {[ln for ln in proc.stderr.splitlines() if 'warning' not in ln][-1:]}")
    return np.load(out)


def _emulated(models: dict[str, str], data_dir: str, cpu: str) -> dict[str, Any]:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("int8_portability: --emulate needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    code = ("import json, sys; from ferry.bench.int8_portability import accuracies; "
            f"print(json.dumps({{'accuracy': accuracies(json.loads(sys.argv[1]), {data_dir!r})}}))")
    proc = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", code, json.dumps(models)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"int8_portability: the emulated run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mnist-cnn.onnx", help="an fp32 digit CNN written by ferry export")
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw")
    parser.add_argument("--emulate", metavar="CPU", help="also measure under qemu-x86_64 -cpu CPU (e.g. EPYC-Milan)")
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    from ferry.core.errors import FerryError
    from ferry.core.fileio import write_json_atomic
    from ferry.export.digits import load_mnist_for_export
    from ferry.export.variants import QUANT_CHOICES, quantize_int8

    try:
        data = load_mnist_for_export(args.data_dir, calib_images=args.calib_images)
        if not Path(args.model).is_file():
            raise FerryError(f"no model at {args.model}")
    except FerryError as exc:
        print(f"int8_portability: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        models = {"fp32": str(args.model)}
        for i, choice in enumerate(QUANT_CHOICES):
            path = Path(tmp) / f"q{i}.onnx"
            quantize_int8(Path(args.model), path, data.calibration, choice=choice)
            models[choice] = str(path)
        from ferry.core.machine import cpu_info

        here = cpu_info()
        runs = [{"cpu": here["cpu"], "cpu_class": here["cpu_class"], "accuracy": accuracies(models, args.data_dir)}]
        if args.emulate:
            # fp32 convolutions are far slower than int8 ones under QEMU's emulation (hours for 10,000
            # images), and fp32 does not depend on VNNI: the emulated run measures the int8 files only
            int8 = {k: v for k, v in models.items() if k != "fp32"}
            runs.append({**_emulated(int8, args.data_dir, args.emulate), "cpu": f"{args.emulate} (QEMU CPU model)",
                         "cpu_class": EMULATED_CLASSES.get(args.emulate, "emulated"),
                         "emulated": f"qemu-x86_64 -cpu {args.emulate}"})
    header = f"{'quantization':<28}" + "".join(f"{r['cpu_class'][:30] + (' (emulated)' if 'emulated' in r else ''):>42}" for r in runs)
    print(header)
    for name in models:
        print(f"{name:<28}" + "".join(f"{100 * r['accuracy'][name]:>41.2f}%" if name in r["accuracy"] else f"{'-':>42}"
                                      for r in runs))
    if args.out:
        write_json_atomic(args.out, {"model": str(args.model), "calibration_images": args.calib_images,
                                     "dataset": "MNIST test (10000 images)", "runs": runs,
                                     "note": "emulated runs reproduce the kernels' arithmetic, not their speed"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
