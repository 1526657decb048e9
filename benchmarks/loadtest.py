"""Load test of the HTTP servers, against 127.0.0.1 only, in one run so the ratios compare like with
like: the one-process `ferry serve` (batching on, and off), Ray Serve with 2 replicas, and the
minimal uvicorn + onnxruntime baseline (ferry.bench.minimal_server).

For each server and model: a closed loop at concurrency 1, 4, 16 and 64 (each client sends its next
request when the last one is answered; a bounded number of requests per level), then an open loop
with Poisson arrivals at a target rate (MLPerf's server scenario; latency counts from the scheduled
arrival, so queueing shows). The one-process servers run side by side and take turns, level by
level, for three rounds; each figure is the median of its rounds (a single pass on a 2-core machine
moves by +-10%). Ray Serve runs alone, after them. Reported: throughput and p50/p99 latency of the
answered requests (200), every status code and client error, and the mean batch size the server
formed (from its /v1/stats). The client runs in this process, the server in another; on a 2-core
machine they share the cores, as the issue's own measurement did.

`ferry serve` runs as in production: API key set (the client sends it), metrics, admission
control and request ids on. A client that gets 503 waits the Retry-After it was given.

  python -m ferry.bench.loadtest --models-dir models --out runs/serve-bench [--quick]
  python -m ferry.bench.loadtest --speed-bar --models-dir models --out runs/serve-speed   # ferry vs baseline at c=16
  python -m ferry.bench.loadtest --overload --models-dir models --out runs/serve-overload  # the 60 s overload run

The overload run (`--overload`): a closed-loop sweep (1, 2, 4, 8, 16, 32 clients, --level-seconds
each) finds the concurrency where the throughput of 200s peaks; then 4x that many clients for
--seconds (60). It checks that every answer is 200, 503 or 504 (no connection reset, no other
5xx), that the throughput of 200s stays >= 90% of the peak and their p99 <= 2x the p99 at the
peak, that the server's /metrics counted exactly what the client got, per status code, and
reports the server's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SERVERS = ("ferry", "ferry-nobatch", "baseline", "ray-serve")
API_KEY = "loadtest-" + "k" * 24  # the key `ferry serve` runs with here (through $FERRY_API_KEY)
FERRY_KINDS = ("ferry", "ferry-nobatch", "ray-serve")


@dataclass
class Level:
    mode: str  # closed | open
    concurrency: int  # closed: clients; open: the cap on requests in flight
    requests: int  # closed: how many in all (unless `seconds`); open: how many arrivals
    rate: float = 0.0  # open: target requests/s
    seconds: float = 0.0  # closed: run for this long instead of a number of requests


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


def start_server(kind: str, models: list[str], port: int, extra: list[str] | None = None) -> subprocess.Popen:
    py = sys.executable
    env = dict(os.environ)
    if kind == "baseline":
        cmd = [py, "-m", "ferry.bench.minimal_server", *models, "--port", str(port)]
    else:
        cmd = [py, "-m", "ferry", "serve", *models, "--port", str(port), *(extra or [])]
        env["FERRY_API_KEY"] = API_KEY  # production settings: the key is checked on every request
        if kind == "ferry-nobatch":
            cmd += ["--max-batch-size", "1"]
        if kind == "ray-serve":
            cmd += ["--address", "local", "--replicas", "2", "--max-batch-size", "16", "--batch-wait-ms", "5"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
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


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> float:
    """SIGTERM to the server process alone (as an orchestrator sends it); seconds until it exited."""
    t0 = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.perf_counter() - t0


def classify(exc: BaseException) -> str:
    """A client-side failure as one word: reset (the connection was reset or dropped mid-request),
    refused, timeout, or error:<type>."""
    import aiohttp

    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return "reset"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused"
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if type(exc).__name__ == "ClientConnectionResetError":
        return "reset"
    return f"error:{type(exc).__name__}"


async def _one(session, url: str, body: bytes, headers: dict) -> tuple[float, int | str, float]:
    """(seconds, status code or client failure, Retry-After seconds)."""
    t0 = time.perf_counter()
    retry = 0.0
    try:
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
            outcome: int | str = r.status
            if r.status == 503:
                try:
                    retry = float(r.headers.get("Retry-After", "1"))
                except ValueError:
                    retry = 1.0
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not raised
        outcome = classify(exc)
    return time.perf_counter() - t0, outcome, retry


async def run_level(url: str, bodies: list[bytes], level: Level, *, api_key: str | None = API_KEY,
                    honour_retry_after: bool = True, timeout_s: float = 60) -> dict[str, Any]:
    """One level against one endpoint. Throughput and latency count the answered requests (200);
    `statuses` counts every outcome (status codes, and client failures: reset, refused, timeout)."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    conn = aiohttp.TCPConnector(limit=max(level.concurrency, 1) + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t_start = time.perf_counter()
        if level.mode == "closed":
            counter = iter(range(level.requests)) if not level.seconds else None
            end = t_start + level.seconds

            def more() -> int | None:
                if counter is None:
                    return statuses.total() if time.perf_counter() < end else None
                return next(counter, None)

            async def client() -> None:
                while (i := more()) is not None:
                    dt, outcome, retry = await _one(session, url, bodies[i % len(bodies)], headers)
                    statuses[outcome] += 1
                    if outcome == 200:
                        latencies.append(dt)
                    elif retry and honour_retry_after:
                        await asyncio.sleep(min(retry, max(0.0, end - time.perf_counter()) if counter is None else retry))
                    elif not isinstance(outcome, int):
                        await asyncio.sleep(0.05)  # a failed connection: do not spin

            await asyncio.gather(*(client() for _ in range(level.concurrency)))
        else:
            rng = random.Random(0)
            sem = asyncio.Semaphore(level.concurrency)
            arrivals, t = [], 0.0
            for _ in range(level.requests):
                t += rng.expovariate(level.rate)
                arrivals.append(t)

            async def scheduled(i: int, at: float) -> None:
                await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
                async with sem:
                    _, outcome, _ = await _one(session, url, bodies[i % len(bodies)], headers)
                statuses[outcome] += 1
                if outcome == 200:
                    latencies.append(time.perf_counter() - (t_start + at))  # from the scheduled arrival

            await asyncio.gather(*(scheduled(i, at) for i, at in enumerate(arrivals)))
        wall = time.perf_counter() - t_start
    lat = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    total = statuses.total()
    return {"mode": level.mode, "concurrency": level.concurrency, "target_rate": level.rate, "requests": total,
            "errors": total - statuses[200], "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "seconds": wall, "throughput_rps": statuses[200] / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def server_stats(url: str) -> dict[str, Any] | None:
    import urllib.request

    try:
        req = urllib.request.Request(url + "/v1/stats", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())["models"]
    except OSError:
        return None


def scrape(url: str, api_key: str | None = API_KEY) -> dict[tuple[str, tuple], float]:
    """The server's /metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def request_counts(page: dict[tuple[str, tuple], float], model: str) -> dict[str, int]:
    """ferry_requests_total of `model` by status code, from `scrape()`."""
    return {dict(labels)["code"]: int(v) for (name, labels), v in page.items()
            if name == "ferry_requests_total" and dict(labels).get("model") == model}


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


def _start(kind: str, model_paths: dict[str, str], extra: list[str] | None = None) -> Running:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(kind, list(model_paths.values()), port, extra)
    try:
        ready = wait_ready(url, proc)
    except BaseException:
        stop_server(proc)
        raise
    return Running(kind, proc, url, ready, rss_mb(proc.pid))


def _one_level(srv: Running, model: str, bodies: list[bytes], level: Level) -> tuple[dict[str, Any], tuple[int, int]]:
    """One level against one server; returns the result and (requests, batches) the server counted."""
    endpoint = f"{srv.url}/v1/models/{model}/predict"
    has_stats = srv.kind in FERRY_KINDS
    before = server_stats(srv.url) if has_stats else None
    r = asyncio.run(run_level(endpoint, bodies, level))
    if srv.kind == "ray-serve":
        time.sleep(1.0)  # the other replica's figures arrive with its next heartbeat
    after = server_stats(srv.url) if has_stats else None
    counted = (0, 0)
    if before and after and model in after and model in before:
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
                        f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  not 200: {r['errors']}"
                        + (f" {_statuses_text(r['statuses'])}" if r["errors"] else "")
                        + (f"  mean batch {r['mean_batch_size']:.2f}" if r.get("mean_batch_size") else "")
                        + (f"  (median of {len(runs)})" if len(runs) > 1 else ""))
        return [{"server": s.kind, "ready_seconds": s.ready_s, "rss_mb_before": s.rss_before,
                 "rss_mb_after": rss_mb(s.proc.pid), "rounds": rounds, "levels": per_server[s.kind]} for s in servers]
    finally:
        for srv in servers:
            stop_server(srv.proc)


def _statuses_text(statuses: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in statuses.items() if k != "200") + ")"


def _median_of(runs: list[tuple[dict[str, Any], tuple[int, int]]]) -> dict[str, Any]:
    results = [r for r, _ in runs]
    out = dict(results[0])
    for key in ("throughput_rps", "p50_ms", "p99_ms", "seconds"):
        out[key] = float(np.median([r[key] for r in results]))
    out["errors"] = sum(r["errors"] for r in results)
    out["requests"] = sum(r["requests"] for r in results)
    statuses: Counter = Counter()
    for r in results:
        statuses.update(r["statuses"])
    out["statuses"] = dict(sorted(statuses.items()))
    out["rounds"] = len(results)
    requests, batches = (sum(c[i] for _, c in runs) for i in (0, 1))
    out["mean_batch_size"] = requests / batches if batches else None
    return out


def plan(models: list[str], quick: bool, speed_bar: bool = False) -> dict[str, list[Level]]:
    out = {}
    for model in models:
        per = (200 if model == "mnist-cnn" else 24) if quick else (1500 if model == "mnist-cnn" else 120)
        if speed_bar:
            out[model] = [Level("closed", 16, max(per, 32))]
            continue
        out[model] = [Level("closed", c, max(per, 2 * c)) for c in ((1, 16) if quick else (1, 4, 16, 64))]
        out[model].append(Level("open", 64, per))
    return out


# --- the overload run --------------------------------------------------------------------------

OVERLOAD_ALLOWED = {"200", "503", "504"}


def overload(model_path: str, model: str, *, seconds: float, level_seconds: float, levels: list[int],
             server_args: list[str], honour_retry_after: bool, log=print) -> dict[str, Any]:
    """The overload run against one `ferry serve` (see the module's doc); returns its record."""
    srv = _start("ferry", {model: model_path}, server_args)
    url = f"{srv.url}/v1/models/{model}/predict"
    bodies = bodies_for(model)
    try:
        asyncio.run(run_level(url, bodies, Level("closed", 4, 40)))  # warm-up
        sweep = []
        for c in levels:
            r = asyncio.run(run_level(url, bodies, Level("closed", c, 0, seconds=level_seconds),
                                      honour_retry_after=honour_retry_after))
            sweep.append(r)
            log(f"  sweep c={c:<3} {r['throughput_rps']:8.1f} req/s of 200  p50 {r['p50_ms']:7.1f} ms  "
                f"p99 {r['p99_ms']:7.1f} ms  {_statuses_text(r['statuses']) if r['errors'] else ''}")
        peak = max(sweep, key=lambda r: r["throughput_rps"])
        clients = 4 * peak["concurrency"]
        rss_before = rss_mb(srv.proc.pid)
        counted_before = request_counts(scrape(srv.url), model)
        log(f"  peak at c={peak['concurrency']} ({peak['throughput_rps']:.1f} req/s, p99 {peak['p99_ms']:.1f} ms); "
            f"overload: {clients} clients for {seconds:g} s")
        r = asyncio.run(run_level(url, bodies, Level("closed", clients, 0, seconds=seconds),
                                  honour_retry_after=honour_retry_after))
        counted_after = request_counts(scrape(srv.url), model)
        rss_after = rss_mb(srv.proc.pid)
    finally:
        stop_s = stop_server(srv.proc)
    counted = {code: counted_after.get(code, 0) - counted_before.get(code, 0) for code in {*counted_before, *counted_after}}
    counted = {k: v for k, v in sorted(counted.items()) if v}
    sent = {k: v for k, v in r["statuses"].items() if k.isdigit()}
    other = {k: v for k, v in r["statuses"].items() if k not in OVERLOAD_ALLOWED}
    checks = {
        "every answer 200, 503 or 504": not other,
        "no connection reset": r["statuses"].get("reset", 0) == 0,
        "no other 5xx": not any(k.isdigit() and k.startswith("5") and k not in OVERLOAD_ALLOWED for k in r["statuses"]),
        "throughput of 200s >= 90% of the peak": r["throughput_rps"] >= 0.9 * peak["throughput_rps"],
        "p99 of 200s <= 2x the p99 at the peak": r["p99_ms"] <= 2 * peak["p99_ms"],
        "/metrics counted what the client got": counted == sent,
    }
    return {"model": model, "server_args": server_args, "honour_retry_after": honour_retry_after, "sweep": sweep,
            "peak": {"concurrency": peak["concurrency"], "throughput_rps": peak["throughput_rps"], "p99_ms": peak["p99_ms"]},
            "overload": {**r, "clients": clients}, "metrics_counted": counted, "client_counted": sent,
            "rss_mb_before": rss_before, "rss_mb_after": rss_after, "stop_seconds": stop_s, "checks": checks,
            "passed": all(checks.values())}


def overload_markdown(result: dict[str, Any]) -> str:
    m, o = result["machine"], result["run"]
    ov, peak = o["overload"], o["peak"]
    lines = ["# Serving overload run", "", f"- created: {result['created']}",
             f"- CPU: {m['cpu']} ({m.get('cpu_id', '')}), class {m['cpu_class']}, {m['logical_cpus']} logical cores; "
             "client and server on the same machine, 127.0.0.1",
             f"- model: {o['model']}; server: `ferry serve` {' '.join(o['server_args'])} (API key, metrics on); "
             f"clients {'wait' if o['honour_retry_after'] else 'do not wait'} the Retry-After of a 503", "",
             "| clients | req/s (200) | p50 ms | p99 ms | answers |", "| ---: | ---: | ---: | ---: | --- |"]
    for r in o["sweep"]:
        lines.append(f"| {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} |")
    lines.append(f"| **{ov['clients']} (overload, {ov['seconds']:.0f} s)** | **{ov['throughput_rps']:.1f}** | "
                 f"{ov['p50_ms']:.1f} | **{ov['p99_ms']:.1f}** | {', '.join(f'{k}: {v}' for k, v in ov['statuses'].items())} |")
    lines += ["", f"Peak: {peak['throughput_rps']:.1f} req/s at {peak['concurrency']} clients (p99 {peak['p99_ms']:.1f} ms). "
              f"Overload: {ov['throughput_rps'] / peak['throughput_rps']:.2f}x the peak throughput, p99 "
              f"{ov['p99_ms'] / peak['p99_ms']:.2f}x. RSS {o['rss_mb_before']:.0f} MiB before, {o['rss_mb_after']:.0f} MiB "
              f"after; stopped {o['stop_seconds']:.1f} s after SIGTERM. /metrics counted {o['metrics_counted']}, "
              f"the client {o['client_counted']}.", "", "| check | |", "| --- | --- |"]
    lines += [f"| {k} | {'met' if v else '**not met**'} |" for k, v in o["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--models", nargs="+", default=["mnist-cnn", "resnet50"])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--out", default="runs/serve-bench")
    parser.add_argument("--quick", action="store_true", help="few requests, two levels (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the one-process servers, interleaved; medians are reported (default: 3)")
    parser.add_argument("--speed-bar", action="store_true",
                        help="only ferry serve (everything on) against the minimal baseline at 16 clients")
    parser.add_argument("--overload", action="store_true", help="the overload run (first model of --models)")
    parser.add_argument("--seconds", type=float, default=60.0, help="--overload: length of the overload (default: 60)")
    parser.add_argument("--level-seconds", type=float, default=8.0,
                        help="--overload: length of each level of the sweep that finds the peak (default: 8)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="--overload: the sweep's client counts (default: 1 2 4 8 16 32)")
    parser.add_argument("--server-args", default="", help="--overload: more `ferry serve` options, e.g. '--max-queue 8'")
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="clients that get 503 retry at once instead of waiting its Retry-After")
    args = parser.parse_args(argv)

    from ferry.core.fileio import write_json_atomic
    from ferry.core.machine import machine_info

    paths = {m: str(Path(args.models_dir) / f"{m}.onnx") for m in args.models}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        print(f"loadtest: error: missing {', '.join(missing)} (run make demo first)", file=sys.stderr)
        return 2
    out = Path(args.out)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.overload:
        model = args.models[0]
        print(f"overload run: {model}", flush=True)
        run = overload(paths[model], model, seconds=args.seconds, level_seconds=args.level_seconds, levels=args.levels,
                       server_args=args.server_args.split(), honour_retry_after=not args.ignore_retry_after,
                       log=lambda m: print(m, flush=True))
        result = {"schema": "ferry.overload/1", "created": created, "machine": machine_info(), "run": run}
        write_json_atomic(out / "overload.json", result)
        (out / "overload.md").write_text(overload_markdown(result))
        print(overload_markdown(result))
        return 0 if run["passed"] else 1
    if args.speed_bar:
        args.servers = [s for s in args.servers if s in ("ferry", "baseline")] or ["ferry", "baseline"]
    levels = plan(args.models, args.quick, args.speed_bar)
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
    result = {"schema": "ferry.loadtest/2", "created": created, "machine": machine_info(), "runs": runs,
              "summary": summarize(runs)}
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
    """The acceptance ratios, from this run: ferry (API key, metrics, admission control on) vs the
    baseline, batching on vs off (concurrency 16),
    and the cost per request of Ray Serve against the one-process server (concurrency 1)."""
    out = []
    for model in sorted({r["model"] for run in runs for r in run["levels"]}):
        ferry, base, nob = (_level(runs, s, model) for s in ("ferry", "baseline", "ferry-nobatch"))
        if ferry and base:
            out.append({"model": model, "comparison": "ferry serve vs minimal baseline, throughput at c=16",
                        "ratio": ferry["throughput_rps"] / base["throughput_rps"], "target": ">= 0.90"})
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
             "| server | model | mode | concurrency | target req/s | req/s (200) | p50 ms | p99 ms | not 200 | mean batch |",
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
