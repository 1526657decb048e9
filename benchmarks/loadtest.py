"""Load test of the HTTP servers, against 127.0.0.1 only, in one run so the ratios compare like with
like: the one-process `ferry serve` (batching on, and off), Ray Serve with 2 replicas, and the
minimal uvicorn + onnxruntime baseline (ferry.bench.minimal_server).

For each server and model: a closed loop at concurrency 1, 4, 16 and 64 (each client sends its next
request when the last one is answered; a bounded number of requests per level), then an open loop
with Poisson arrivals at a target rate (MLPerf's server scenario; latency counts from the scheduled
arrival, so queueing shows). The one-process servers run side by side and take turns, level by
level, for three rounds; each figure is the median of its rounds (a single pass on a 2-core machine
moves by +-10%). Ray Serve runs alone, after them. Reported: throughput, p50/p99 latency, errors, and the mean batch size
the server formed (from its /v1/stats). The client runs in this process, the server in another;
on a 2-core machine they share the cores, as the issue's own measurement did.

  python -m ferry.bench.loadtest --models-dir models --out runs/serve-bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SERVERS = ("ferry", "ferry-nobatch", "baseline", "ray-serve")


@dataclass
class Level:
    mode: str  # closed | open
    concurrency: int  # closed: clients; open: the cap on requests in flight
    requests: int
    rate: float = 0.0  # open: target requests/s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a uvicorn or Ray process tree), in MiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def start_server(kind: str, models: list[str], port: int) -> subprocess.Popen:
    py = sys.executable
    if kind == "baseline":
        cmd = [py, "-m", "ferry.bench.minimal_server", *models, "--port", str(port)]
    else:
        cmd = [py, "-m", "ferry", "serve", *models, "--port", str(port)]
        if kind == "ferry-nobatch":
            cmd += ["--max-batch-size", "1"]
        if kind == "ray-serve":
            cmd += ["--address", "local", "--replicas", "2", "--max-batch-size", "16", "--batch-wait-ms", "5"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _one(session, url: str, body: bytes) -> tuple[float, bool]:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body) as r:
            await r.read()
            ok = r.status == 200
    except Exception:  # noqa: BLE001 - a failed request is counted, not raised
        ok = False
    return time.perf_counter() - t0, ok


async def run_level(url: str, bodies: list[bytes], level: Level) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=max(level.concurrency, 1) + 4)
    async with aiohttp.ClientSession(connector=conn) as session:
        t_start = time.perf_counter()
        if level.mode == "closed":
            counter = iter(range(level.requests))

            async def client() -> None:
                nonlocal errors
                for i in counter:
                    dt, ok = await _one(session, url, bodies[i % len(bodies)])
                    latencies.append(dt)
                    errors += not ok

            await asyncio.gather(*(client() for _ in range(level.concurrency)))
        else:
            rng = random.Random(0)
            sem = asyncio.Semaphore(level.concurrency)
            arrivals, t = [], 0.0
            for _ in range(level.requests):
                t += rng.expovariate(level.rate)
                arrivals.append(t)

            async def scheduled(i: int, at: float) -> None:
                nonlocal errors
                await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
                async with sem:
                    _, ok = await _one(session, url, bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - (t_start + at))  # from the scheduled arrival
                errors += not ok

            await asyncio.gather(*(scheduled(i, at) for i, at in enumerate(arrivals)))
        wall = time.perf_counter() - t_start
    lat = np.asarray(latencies) * 1e3
    return {"mode": level.mode, "concurrency": level.concurrency, "target_rate": level.rate, "requests": level.requests,
            "errors": errors, "seconds": wall, "throughput_rps": (level.requests - errors) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def server_stats(url: str) -> dict[str, Any] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/v1/stats", timeout=5) as r:
            return json.loads(r.read())["models"]
    except OSError:
        return None


def bodies_for(model: str) -> list[bytes]:
    from ferry.core.samples import sample_digits, sample_photos

    return [p.read_bytes() for p in (sample_digits() if model == "mnist-cnn" else sample_photos())]


@dataclass
class Running:
    kind: str
    proc: subprocess.Popen
    url: str
    ready_s: float
    rss_before: float


def _start(kind: str, model_paths: dict[str, str]) -> Running:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(kind, list(model_paths.values()), port)
    try:
        ready = wait_ready(url, proc)
    except BaseException:
        stop_server(proc)
        raise
    return Running(kind, proc, url, ready, rss_mb(proc.pid))


def _one_level(srv: Running, model: str, bodies: list[bytes], level: Level) -> tuple[dict[str, Any], tuple[int, int]]:
    """One level against one server; returns the result and (requests, batches) the server counted
    (0, 0 behind Ray Serve: /v1/stats counts one replica, and two reads may reach two replicas)."""
    endpoint = f"{srv.url}/v1/models/{model}/predict"
    before = server_stats(srv.url) if srv.kind != "ray-serve" else None
    r = asyncio.run(run_level(endpoint, bodies, level))
    after = server_stats(srv.url) if srv.kind != "ray-serve" else None
    counted = (0, 0)
    if before and after and model in after:
        counted = (after[model]["requests"] - before[model]["requests"], after[model]["batches"] - before[model]["batches"])
    return r, counted


def measure_servers(kinds: list[str], model_paths: dict[str, str], levels: dict[str, list[Level]], log,
                    rounds: int = 1) -> list[dict[str, Any]]:
    """Start `kinds` together and measure each level on each server in turn, `rounds` times, so that
    drift on a shared machine hits all alike; report medians over the rounds."""
    servers = []
    try:
        for kind in kinds:
            servers.append(_start(kind, model_paths))
        per_server: dict[str, list[dict[str, Any]]] = {s.kind: [] for s in servers}
        for model, model_levels in levels.items():
            bodies = bodies_for(model)
            for srv in servers:  # warm-up
                asyncio.run(run_level(f"{srv.url}/v1/models/{model}/predict", bodies, Level("closed", 4, 20)))
            for level in model_levels:
                tries: dict[str, list] = {s.kind: [] for s in servers}
                for _ in range(rounds):
                    for srv in servers:
                        lv = level
                        if level.mode == "open" and level.rate <= 0:  # 70% of this server's best closed-loop rate
                            best = max(r["throughput_rps"] for r in per_server[srv.kind] if r["model"] == model
                                       and r["mode"] == "closed")
                            lv = Level("open", level.concurrency, level.requests, rate=round(0.7 * best, 1))
                        tries[srv.kind].append(_one_level(srv, model, bodies, lv))
                for kind, runs in tries.items():
                    r = _median_of(runs)
                    per_server[kind].append({"server": kind, "model": model, **r})
                    log(f"  {kind:<14} {model:<10} {r['mode']:<6} c={r['concurrency']:<3} {r['throughput_rps']:8.1f} req/s  "
                        f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}"
                        + (f"  mean batch {r['mean_batch_size']:.2f}" if r.get("mean_batch_size") else "")
                        + (f"  (median of {len(runs)})" if len(runs) > 1 else ""))
        return [{"server": s.kind, "ready_seconds": s.ready_s, "rss_mb_before": s.rss_before,
                 "rss_mb_after": rss_mb(s.proc.pid), "rounds": rounds, "levels": per_server[s.kind]} for s in servers]
    finally:
        for srv in servers:
            stop_server(srv.proc)


def _median_of(runs: list[tuple[dict[str, Any], tuple[int, int]]]) -> dict[str, Any]:
    results = [r for r, _ in runs]
    out = dict(results[0])
    for key in ("throughput_rps", "p50_ms", "p99_ms", "seconds"):
        out[key] = float(np.median([r[key] for r in results]))
    out["errors"] = sum(r["errors"] for r in results)
    out["requests"] = sum(r["requests"] for r in results)
    out["rounds"] = len(results)
    requests, batches = (sum(c[i] for _, c in runs) for i in (0, 1))
    out["mean_batch_size"] = requests / batches if batches else None
    return out


def plan(models: list[str], quick: bool) -> dict[str, list[Level]]:
    out = {}
    for model in models:
        per = (200 if model == "mnist-cnn" else 24) if quick else (1500 if model == "mnist-cnn" else 120)
        out[model] = [Level("closed", c, max(per, 2 * c)) for c in ((1, 16) if quick else (1, 4, 16, 64))]
        out[model].append(Level("open", 64, per))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--models", nargs="+", default=["mnist-cnn", "resnet50"])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--out", default="runs/serve-bench")
    parser.add_argument("--quick", action="store_true", help="few requests, two levels (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the one-process servers, interleaved; medians are reported (default: 3)")
    args = parser.parse_args(argv)

    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import machine_info

    paths = {m: str(Path(args.models_dir) / f"{m}.onnx") for m in args.models}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        print(f"loadtest: error: missing {', '.join(missing)} (run make demo first)", file=sys.stderr)
        return 2
    levels = plan(args.models, args.quick)
    runs = []
    one_process = [k for k in args.servers if k != "ray-serve"]
    # the one-process servers side by side, interleaved over rounds; Ray Serve alone (its Ray
    # processes would load the machine under the others)
    groups = [(one_process, args.rounds)] + ([(["ray-serve"], 1)] if "ray-serve" in args.servers else [])
    for kinds, rounds in groups:
        if not kinds:
            continue
        print(f"{', '.join(kinds)}:", flush=True)
        try:
            runs.extend(measure_servers(kinds, paths, levels, lambda m: print(m, flush=True), rounds=rounds))
        except (RuntimeError, OSError) as exc:
            runs.extend({"server": k, "error": str(exc)[:500], "levels": []} for k in kinds)
            print(f"  {', '.join(kinds)}: not measured: {str(exc)[:300]}", flush=True)
    result = {"schema": "ferry.loadtest/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), "runs": runs, "summary": summarize(runs)}
    out = Path(args.out)
    write_json_atomic(out / "loadtest.json", result)
    (out / "loadtest.md").write_text(markdown(result))
    plot(result, out / "loadtest.png")
    print(markdown(result))
    return 0


def _level(runs, server, model, mode="closed", concurrency=16):
    for run in runs:
        if run["server"] == server:
            for r in run["levels"]:
                if r["model"] == model and r["mode"] == mode and r["concurrency"] == concurrency:
                    return r
    return None


def summarize(runs: list[dict]) -> list[dict[str, Any]]:
    """The acceptance ratios, from this run: ferry vs the baseline, batching on vs off (concurrency 16),
    and the cost per request of Ray Serve against the one-process server (concurrency 1)."""
    out = []
    for model in sorted({r["model"] for run in runs for r in run["levels"]}):
        ferry, base, nob = (_level(runs, s, model) for s in ("ferry", "baseline", "ferry-nobatch"))
        if ferry and base:
            out.append({"model": model, "comparison": "ferry serve vs minimal baseline, throughput at c=16",
                        "ratio": ferry["throughput_rps"] / base["throughput_rps"], "target": ">= 0.80"})
        if ferry and nob:
            out.append({"model": model, "comparison": "batching on vs off, throughput at c=16",
                        "ratio": ferry["throughput_rps"] / nob["throughput_rps"], "target": ">= 0.95"})
        one, ray1 = _level(runs, "ferry", model, concurrency=1), _level(runs, "ray-serve", model, concurrency=1)
        if one and ray1:
            out.append({"model": model, "comparison": "Ray Serve extra latency per request at c=1 (ms, p50)",
                        "ratio": ray1["p50_ms"] - one["p50_ms"], "target": "reported"})
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Serving load test", "", f"- created: {result['created']}",
             f"- CPU: {m['cpu']} ({m.get('cpu_id', '')}), class {m['cpu_class']}, {m['logical_cpus']} logical cores; "
             "client and server on the same machine, 127.0.0.1", "",
             "| server | model | mode | concurrency | target req/s | req/s | p50 ms | p99 ms | errors | mean batch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in result["runs"]:
        for r in run["levels"]:
            mb = r.get("mean_batch_size")
            lines.append(f"| {r['server']} | {r['model']} | {r['mode']} | {r['concurrency']} | "
                         f"{r['target_rate'] or '-'} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} | {f'{mb:.2f}' if mb else '-'} |")
    lines += ["", "| server | ready after s | RSS before MiB | RSS after MiB |", "| --- | ---: | ---: | ---: |"]
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"| {run['server']} | not measured: {run['error'][:120]} | | |")
        else:
            lines.append(f"| {run['server']} | {run['ready_seconds']:.1f} | {run['rss_mb_before']:.0f} | {run['rss_mb_after']:.0f} |")
    lines += ["", "| model | comparison (same run) | value | target |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s['model']} | {s['comparison']} | {s['ratio']:.2f} | {s['target']} |" for s in result["summary"]]
    return "\n".join(lines) + "\n\n![load test](loadtest.png)\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for run in result["runs"] for r in run["levels"]})
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        for run in result["runs"]:
            rs = [r for r in run["levels"] if r["model"] == model and r["mode"] == "closed"]
            if rs:
                c = [r["concurrency"] for r in rs]
                axes[0][j].plot(c, [r["throughput_rps"] for r in rs], "o-", label=run["server"])
                axes[1][j].plot(c, [r["p99_ms"] for r in rs], "o-", label=run["server"])
        for i, ylabel in enumerate(("throughput (req/s)", "p99 latency (ms)")):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("concurrent clients (closed loop)")
            axes[i][j].set_ylabel(ylabel)
            axes[i][j].grid(alpha=0.3, which="both")
        axes[0][j].set_title(model)
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
