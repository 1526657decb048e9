"""GPU tuning, measured: onnxruntime's CUDA options one at a time and together (an ablation), and
the best PyTorch can do, at the same precision and batch, in one run on one GPU.

onnxruntime (ResNet-50 by default), each configuration a row at batch 1 and at the largest batch:
  - base: the fp32 file, CUDA provider with ferry's defaults, host input copied in and logits copied
    out through IO binding (what `Classifier.infer` does);
  - one change at a time: the fp16 file (float32 edges, Cast nodes inside); fp16 inputs and outputs
    end to end (the fp16 graph without edge casts, converted here); `prefer_nhwc`;
    `cudnn_conv_algo_search` DEFAULT / HEURISTIC instead of EXHAUSTIVE; no maximum cuDNN workspace;
    inputs and outputs resident on the device (IO binding with device OrtValues: no copies);
    pinned host buffers for the copies; CUDA graphs (`enable_cuda_graph`, device-resident and fixed
    shapes, as they require);
  - all winners together.
PyTorch: eager fp32 NCHW (the old baseline), fp16 (`.half()`), channels_last, `cudnn.benchmark`,
autocast fp16, and `torch.compile` with `max-autotune` and `reduce-overhead` (CUDA graphs), inputs
already on the device; the best is named and compared with onnxruntime's best at the same precision
and batch. Every onnxruntime row has its provider read back from the session; a CPU fallback is an
error, never a row. `--dry-run` checks the script on any machine (GPU rows then skip, with the reason).

  python -m ferry.bench.gpu_tuning --models-dir MODELS --out OUT [--model resnet50] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.bench.harness import measure


@dataclass
class OrtConfig:
    name: str
    file: str = "fp32"  # fp32 | fp16 | fp16io (the fp16 graph with float16 inputs and outputs, made here)
    options: dict[str, str] = field(default_factory=dict)  # CUDA provider options over ferry's defaults
    io: str = "host"  # host (numpy in, numpy out) | pinned (pinned host buffers) | device (device-resident)
    cuda_graph: bool = False


ABLATION = (
    OrtConfig("base: fp32 file, host copies"),
    OrtConfig("fp16 file (float32 edges)", file="fp16"),
    OrtConfig("fp16 inputs and outputs end to end", file="fp16io"),
    OrtConfig("prefer_nhwc", options={"prefer_nhwc": "1"}),
    OrtConfig("cudnn_conv_algo_search=HEURISTIC", options={"cudnn_conv_algo_search": "HEURISTIC"}),
    OrtConfig("cudnn_conv_algo_search=DEFAULT", options={"cudnn_conv_algo_search": "DEFAULT"}),
    OrtConfig("no maximum cuDNN workspace", options={"cudnn_conv_use_max_workspace": "0"}),
    OrtConfig("pinned host buffers", io="pinned"),
    OrtConfig("inputs and outputs on the device", io="device"),
    OrtConfig("CUDA graphs (device-resident)", io="device", cuda_graph=True),
    OrtConfig("together: fp16 I/O, prefer_nhwc, device-resident, CUDA graphs", file="fp16io",
              options={"prefer_nhwc": "1"}, io="device", cuda_graph=True),
)


def fp16_io_model(fp32_path: Path, target: Path) -> Path:
    """The fp16 graph with float16 inputs and outputs (no Cast at the edges), for the ablation."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=False), str(target))
    return target


def ort_session(path: Path, cfg: OrtConfig, *, cpu_check: bool = False):
    """A CUDA session with ferry's options and the config's changes; the provider read back.
    `cpu_check` (the dry run): the CPU provider instead, so every I/O path runs somewhere; its rows
    say CPUExecutionProvider and are never GPU figures."""
    import onnxruntime as ort

    from ferry.runtime.providers import CUDA_OPTIONS

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if cpu_check:
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        return session, {}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable(f"onnxruntime {ort.__version__} has no CUDA provider here")
    options = {**CUDA_OPTIONS, **cfg.options}
    if cfg.cuda_graph:
        options["enable_cuda_graph"] = "1"
    session = ort.InferenceSession(str(path), sess_options=so, providers=[("CUDAExecutionProvider", options)])
    used = session.get_providers()[0]
    if used != "CUDAExecutionProvider":
        raise RuntimeError(f"{cfg.name}: the session runs on {used}, not CUDA: refused")
    return session, session.get_provider_options().get("CUDAExecutionProvider", {})


class Unavailable(Exception):
    pass


def ort_runner(session, cfg: OrtConfig, batch: int, shape: tuple[int, ...], classes: int, *, device: str = "cuda"
               ) -> Callable[[], Any]:
    """One timed call for the config's I/O mode; device-resident buffers are bound once. `device`
    "cpu" (the dry run) binds host buffers where the GPU run binds device ones."""
    import onnxruntime as ort

    pinned = "cuda_pinned" if device == "cuda" else "cpu"

    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    out_dtype = np.float16 if "float16" in session.get_outputs()[0].type else np.float32
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(dtype)
    binding = session.io_binding()
    if cfg.io == "host":
        def run():
            binding.bind_cpu_input(in_name, x)
            binding.bind_output(out_name, device)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return run
    if cfg.io == "pinned":
        x_pinned = ort.OrtValue.ortvalue_from_numpy(x, pinned, 0)
        y_pinned = ort.OrtValue.ortvalue_from_shape_and_type([batch, classes], out_dtype, pinned, 0)
        binding.bind_ortvalue_input(in_name, x_pinned)
        binding.bind_ortvalue_output(out_name, y_pinned)
        return lambda: session.run_with_iobinding(binding)
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([batch, classes], out_dtype, device, 0)
    binding.bind_ortvalue_input(in_name, x_dev)
    binding.bind_ortvalue_output(out_name, y_dev)
    session.run_with_iobinding(binding)  # with CUDA graphs: this run captures the graph
    return lambda: session.run_with_iobinding(binding)


def torch_variants(arch: str, batch: int, shape: tuple[int, ...], device: str) -> dict[str, Callable[[], Any]]:
    """PyTorch at its best: each variant's call on a device-resident input (synchronised by the caller)."""
    import torch

    from ferry.models import tvmodels

    def build(half: bool, channels_last: bool):
        m, _ = tvmodels.create(arch, tvmodels.Weights("none"))
        m = m.to(device).eval()
        x = torch.randn(batch, *shape, device=device)
        if half:
            m, x = m.half(), x.half()
        if channels_last:
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        return m, x

    def call(m, x, autocast: bool = False):
        def run():
            with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=autocast):
                return m(x)
        return run

    out: dict[str, Callable[[], Any]] = {}
    m, x = build(False, False)
    out["eager fp32 NCHW"] = call(m, x)
    m, x = build(False, True)
    out["eager fp32 channels_last"] = call(m, x)
    m, x = build(False, True)
    out["eager autocast fp16 channels_last"] = call(m, x, autocast=True)
    m, x = build(True, False)
    out["eager fp16 NCHW"] = call(m, x)
    m, x = build(True, True)
    out["eager fp16 channels_last"] = call(m, x)
    for mode in ("max-autotune", "reduce-overhead"):
        m, x = build(True, True)
        out[f"torch.compile {mode} fp16 channels_last"] = call(torch.compile(m, mode=mode), x)
    return out


def run(models_dir: Path, out: Path, *, model: str = "resnet50", batches: tuple[int, ...] = (1, 256),
        dry_run: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import machine_info
    from ferry.runtime import contract

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dry_run:
        batches = (1, 2)
    fp32 = contract.variant_path(models_dir, model, "fp32")
    meta = contract.read(fp32)
    shape = meta.input_shape
    files = {"fp32": fp32, "fp16": contract.variant_path(models_dir, model, "fp16")}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timing = dict(warmup=3 if dry_run else 20, min_calls=5 if dry_run else 200, min_seconds=0.1 if dry_run else 2.0,
                  max_seconds=1.0 if dry_run else 10.0)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="ferry-tuning-")  # the converted fp16-I/O model: not a result
    for cfg in ABLATION:
        if cfg.file == "fp16" and not files["fp16"].is_file():
            skipped.append({"engine": "onnxruntime", "config": cfg.name, "reason": f"no {files['fp16'].name} (export with --fp16)"})
            continue
        try:
            if cfg.file == "fp16io" and "fp16io" not in files:
                files["fp16io"] = fp16_io_model(fp32, Path(scratch.name) / f"{model}.fp16io.onnx")
            session, options = ort_session(files[cfg.file], cfg, cpu_check=dry_run and not cuda)
        except Unavailable as exc:
            skipped.append({"engine": "onnxruntime", "config": cfg.name, "reason": str(exc)})
            continue
        for batch in batches:
            try:
                call = ort_runner(session, cfg, batch, shape, meta.num_classes, device=device)
            except Exception as exc:  # noqa: BLE001 - an option this build does not support is a skip with its reason
                skipped.append({"engine": "onnxruntime", "config": cfg.name, "batch": batch,
                                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            t = measure(call, batch_size=batch, sync=sync, **timing)
            rows.append({"engine": "onnxruntime", "config": cfg.name, "batch": batch, "precision": "fp16" if "fp16" in cfg.file else "fp32",
                         "copies": {"host": "host in and out", "pinned": "pinned host in and out", "device": "none (device-resident)"}[cfg.io],
                         "provider": session.get_providers()[0], "provider_options": options, **t.summary_ms(),
                         "throughput_ips": t.throughput, "stable": t.stable})
            log(f"ort  {cfg.name:<60} b{batch:<4} p50 {rows[-1]['p50_ms']:.3f} ms  {t.throughput:,.0f} img/s")
        del session
    if not cuda:
        skipped.append({"engine": "torch", "config": "all variants", "reason": "torch sees no CUDA device"})
    else:
        arch = meta.info.get("source", {}).get("arch", model)
        for batch in batches:
            for name, call in torch_variants(arch, batch, shape, device).items():
                try:
                    t = measure(call, batch_size=batch, sync=sync, **timing)
                except Exception as exc:  # noqa: BLE001 - a compile mode that fails is a skip with its reason
                    skipped.append({"engine": "torch", "config": name, "batch": batch, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                rows.append({"engine": "torch", "config": name, "batch": batch, "precision": "fp16" if "fp16" in name else "fp32",
                             "copies": "none (device-resident)", "provider": f"cuda:{torch.cuda.current_device()}",
                             **t.summary_ms(), "throughput_ips": t.throughput, "stable": t.stable})
                log(f"torch {name:<59} b{batch:<4} p50 {rows[-1]['p50_ms']:.3f} ms  {t.throughput:,.0f} img/s")
    scratch.cleanup()
    result = {"model": model, "machine": {**machine_info(), "gpu": torch.cuda.get_device_name(0) if cuda else None},
              "dry_run": dry_run, "rows": rows, "skipped": skipped, "best": best_of(rows)}
    write_json_atomic(out / "gpu_tuning.json", result)
    (out / "gpu_tuning.md").write_text(markdown(result))
    return result


def best_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per precision and batch: the fastest onnxruntime and PyTorch rows (p50 at batch 1, throughput
    above) and onnxruntime's speed-up over PyTorch's best; PyTorch winning is reported as such."""
    out = []
    for precision in sorted({r["precision"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            group = [r for r in rows if r["precision"] == precision and r["batch"] == batch and r["copies"].startswith("none")
                     and r["provider"] != "CPUExecutionProvider"]
            by = {e: [r for r in group if r["engine"] == e] for e in ("onnxruntime", "torch")}
            if not (by["onnxruntime"] and by["torch"]):
                continue
            key = (lambda r: r["p50_ms"]) if batch == 1 else (lambda r: -r["throughput_ips"])
            ort_best, torch_best = min(by["onnxruntime"], key=key), min(by["torch"], key=key)
            speedup = (torch_best["p50_ms"] / ort_best["p50_ms"]) if batch == 1 else ort_best["throughput_ips"] / torch_best["throughput_ips"]
            out.append({"precision": precision, "batch": batch, "onnxruntime": ort_best["config"], "torch": torch_best["config"],
                        "onnxruntime_vs_best_torch": speedup})
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# GPU tuning: {result['model']}", "", f"- GPU: {m.get('gpu') or 'none (dry run)'}; CPU {m['cpu']} ({m['cpu_class']})",
             "", "| engine | configuration | batch | precision | copies | p50 ms | p99 ms | images/s | stable |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['engine']} | {r['config']} | {r['batch']} | {r['precision']} | {r['copies']} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {r['throughput_ips']:,.0f} | {'yes' if r['stable'] else 'no'} |" for r in result["rows"]]
    if result["best"]:
        lines += ["", "| precision | batch | best onnxruntime | best PyTorch | onnxruntime vs PyTorch |", "| --- | ---: | --- | --- | ---: |"]
        lines += [f"| {b['precision']} | {b['batch']} | {b['onnxruntime']} | {b['torch']} | {b['onnxruntime_vs_best_torch']:.2f}x |"
                  for b in result["best"]]
    if result["skipped"]:
        lines += ["", "Skipped:", *[f"- {s['engine']} {s['config']}{' batch ' + str(s['batch']) if 'batch' in s else ''}: {s['reason']}"
                                    for s in result["skipped"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(Path(args.models_dir), out, model=args.model, batches=tuple(args.batches), dry_run=args.dry_run)
    print(json.dumps(result["best"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
