"""`ferry serve` over real HTTP on 127.0.0.1: answers equal `ferry predict`; bad input is a 4xx and the
server keeps serving; an oversized body's 413 reaches a client that is still sending; API keys
(never on the command line) and open probes; request ids and 500s logged with their traceback;
overload shed with 503 + Retry-After and the metrics counting exactly; the deadline (504, work
dropped); SIGTERM drains; reload without restart under load; --workers sharing metrics; the live
server fuzzed by Schemathesis against its own OpenAPI description; Ray Serve with 2 replicas on the
session's Ray and a `--address local` server stopped under load; and the Triton model repository
against Triton's own schema."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    BAD_IMAGES,
    REPO,
    assert_clean_error,
    free_port,
    run_ferry,
    write_bad_images,
    write_digit_pngs,
)

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, body parsed as JSON when it is JSON, headers with lower-case names)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as exc:
        status, raw, hdrs = exc.code, exc.read(), exc.headers
    h = {k.lower(): v for k, v in hdrs.items()}
    return status, (json.loads(raw) if h.get("content-type", "").startswith("application/json") else raw.decode()), h


def digit_png(value: int = 1) -> bytes:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    return buf.getvalue()


def photo_png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text, _ = http("GET", url + "/metrics", headers=headers)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


class Server:
    """`ferry serve` in a subprocess. Its output goes to files, not pipes: a pipe nobody reads fills
    up after 64 KiB of log lines and then blocks the server's event loop on its next write."""

    def __init__(self, *models, args=(), env=None, timeout: float = 90):
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", *map(str, models), "--port", str(self.port),
                                      *args], cwd=REPO, stdout=self._out, stderr=self._err, text=True,
                                     env={**os.environ, "FERRY_API_KEY": "", **(env or {})})
        self.stop_seconds = None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self._read(self._err)}")
            try:
                if http("GET", self.url + "/readyz", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError("server did not start")

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str, str]:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.stop_seconds = time.monotonic() - t0
        return self.proc.returncode, self._read(self._out), self._read(self._err)

    @staticmethod
    def _read(f) -> str:
        f.flush()
        f.seek(0)
        return f.read()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def assert_clean_stop(server: Server, *, within: float = 20.0) -> tuple[str, str]:
    """Exit code 0 within `within` seconds of SIGTERM, and nothing logged at ERROR or as a traceback."""
    code, out, err = server.stop()
    assert code == 0, (code, out, err)
    assert "Traceback" not in err and " ERROR " not in err, err
    assert server.stop_seconds < within, server.stop_seconds
    return out, err


@pytest.fixture
def server(cnn_export, resnet_export):
    s = Server(cnn_export[0], resnet_export.paths["fp32"], args=["--max-body-mb", "2"])
    yield s
    assert_clean_stop(s)


def test_many_different_images_at_once_each_get_their_own_answer(server, cnn_export, tmp_path):
    from ferry.runtime import Classifier

    files = write_digit_pngs(tmp_path / "d", 48, seed=11)
    clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
    expected = {f.name: clf.predict(f, top_k=3) for f in files}

    def ask(f: Path):
        return f.name, http("POST", f"{server.url}/v1/models/mnist-cnn/predict?top_k=3", f.read_bytes())

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, files * 2))
    assert len(answers) == 96
    for name, (status, body, headers) in answers:
        want = expected[name]
        assert status == 200 and body["model"] == "mnist-cnn" and body["index"] == want.index
        assert abs(body["probability"] - want.probability) <= 1e-6
        assert [c["index"] for c in body["top_k"]] == [c.index for c in want.top_k]
        assert body["provider"] == "CPUExecutionProvider" and body["latency_ms"] > 0
        assert body["request_id"] == headers["x-request-id"]
    assert len({h["x-request-id"] for _, (_, _, h) in answers}) == 96  # one id per request
    status, stats, _ = http("GET", server.url + "/v1/stats")
    assert status == 200 and stats["models"]["mnist-cnn"]["requests"] >= 96
    assert stats["models"]["resnet50"] == {"requests": 0, "batches": 0, "mean_batch_size": 0.0}


def test_the_api_lists_models_and_takes_multipart(server):
    status, body, _ = http("GET", server.url + "/v1/models")
    by_name = {m["name"]: m for m in body["models"]}
    assert status == 200 and set(by_name) == {"mnist-cnn", "resnet50"}
    assert by_name["resnet50"]["labels"][281] == "tabby cat" and by_name["mnist-cnn"]["preprocess"]["kind"] == "mnist"
    assert by_name["resnet50"]["precision"] == "fp32" and by_name["resnet50"]["untrained"] is True
    assert by_name["resnet50"]["load_seconds"] > 0
    assert http("GET", server.url + "/readyz")[1] == {"status": "ready", "models": ["mnist-cnn", "resnet50"]}
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo, "JPEG")
    boundary = "ferryboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    status, pred, _ = http("POST", server.url + "/v1/models/resnet50/predict?top_k=5", multipart,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and len(pred["top_k"]) == 5 and pred["model"] == "resnet50"
    raw = http("POST", server.url + "/v1/models/resnet50/predict?top_k=5", photo.getvalue())[1]
    assert raw["index"] == pred["index"] and abs(raw["probability"] - pred["probability"]) < 1e-9
    status, page, headers = http("GET", server.url + "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for needle in ("/v1/models/{name}/predict", "top_k", "413", "503", "Retry-After", "/v1/admin/reload", "/metrics"):
        assert needle in page, needle


def test_bad_requests_are_4xx_one_line_and_the_server_keeps_serving(server, tmp_path):
    folder = write_bad_images(tmp_path / "bad")
    predict = server.url + "/v1/models/mnist-cnn/predict"
    expected_status = {"h_bomb.png": 413}
    for name, needle in {**BAD_IMAGES, "d_empty.png": "empty body"}.items():
        status, body, _ = http("POST", predict, (folder / name).read_bytes())
        assert status == expected_status.get(name, 400) and needle in body["error"], (name, status, body)
        assert "\n" not in body["error"]
    good = (folder / "a_good.png").read_bytes()
    # typed query parsing: '²' passes str.isdigit() and int() refuses it: a 400 naming the parameter
    for query in ("top_k=%C2%B2", "top_k=0", "top_k=101", "top_k=abc", "top_k=1&top_k=2", "top_k=", "top_k=%201"):
        status, body, _ = http("POST", f"{predict}?{query}", good)
        assert status == 400 and "top_k" in body["error"], (query, status, body)
    assert http("POST", server.url + "/v1/models/nope/predict", b"x")[0] == 404
    assert http("POST", predict, b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"})[0] == 400
    status, body, headers = http("DELETE", server.url + "/v1/models")
    assert status == 405 and "GET" in headers["allow"] and body["request_id"] == headers["x-request-id"]
    # over --max-body-mb 2, refused from the Content-Length; the 413 must reach a client that is still
    # sending: urllib sends "Connection: close", so a server that closes at once resets the connection
    status, body, _ = http("POST", predict, b"\0" * (3 * 2**20))
    assert status == 413 and "over the limit" in body["error"]
    # a chunked body (no Content-Length) over the limit: cut while it is read, and the 413 still arrives
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/models/mnist-cnn/predict", body=iter([b"\0" * 2**20] * 5), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()
    status, body, _ = http("POST", predict, good)
    assert status == 200 and body["label"] in set("0123456789")


def test_soak_of_2000_mixed_requests(server, tmp_path):
    """A bounded soak: 2,000 good and bad requests from 8 clients; every one is answered, memory stays flat."""
    good = [p.read_bytes() for p in write_digit_pngs(tmp_path / "g", 20, seed=3)]
    bad = [p.read_bytes() for p in sorted(write_bad_images(tmp_path / "b").iterdir()) if p.name in BAD_IMAGES]
    bodies = [(b, 200) for b in good] + [(b, None) for b in bad]
    for body, _ in bodies[:50]:  # warm-up
        http("POST", server.url + "/v1/models/mnist-cnn/predict", body)
    rss_before = server.rss_mb()

    def ask(i: int):
        body, want = bodies[i % len(bodies)]
        status = http("POST", server.url + "/v1/models/mnist-cnn/predict", body)[0]
        return status == want if want else 400 <= status < 500

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, range(2000)))
    rss_after = server.rss_mb()
    print(f"soak: 2000 requests, RSS {rss_before:.1f} MiB before, {rss_after:.1f} MiB after")
    assert all(results)
    assert rss_after - rss_before < 40, (rss_before, rss_after)


def test_options_of_the_other_host_are_refused_not_ignored(monkeypatch):
    from ferry.core.errors import FerryError
    from ferry.serve.local import ServeOptions, check_options

    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    with pytest.raises(FerryError, match="--replicas 3 is for Ray Serve"):
        check_options(ServeOptions(models=["m.onnx"], port=0, replicas=3))
    with pytest.raises(FerryError, match="--workers 2 is for the local server"):
        check_options(ServeOptions(models=["m.onnx"], port=0, workers=2, address="auto"))
    check_options(ServeOptions(models=["m.onnx"], port=0, workers=2))  # each where it belongs
    check_options(ServeOptions(models=["m.onnx"], port=8000, replicas=3, address="auto"))
    # on Ray Serve every node's proxy would pick a port of its own, which the banner could not show
    with pytest.raises(FerryError, match="--port 0 is for the local server"):
        check_options(ServeOptions(models=["m.onnx"], port=0, address="auto"))
    with pytest.raises(FerryError, match=r"--replace is for Ray Serve \(with --address\)"):
        check_options(ServeOptions(models=["m.onnx"], port=0, replace=True))


def test_a_malformed_address_is_refused_with_every_accepted_form(monkeypatch):
    """`--address garbage` used to list auto, HOST:PORT and ray://HOST:PORT only (the words of `ferry
    batch`), not `local`, which `ferry serve` also takes; now each is named, before Ray is imported."""
    from ferry.core.errors import FerryError
    from ferry.serve.local import ServeOptions, check_options

    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    forms = ("expected auto", "HOST:PORT (a port of 1 to 65535)", "ray://HOST:PORT", "local (start a local Ray")
    for address in ("garbage", "127.0.0.1:99999", "ray://host", ":6379"):
        with pytest.raises(FerryError) as info:
            check_options(ServeOptions(models=["m.onnx"], address=address))
        assert f"--address {address!r}: " in str(info.value) and all(f in str(info.value) for f in forms), str(info.value)
    for address in ("auto", "local", "127.0.0.1:6379", "ray://head:10001"):
        check_options(ServeOptions(models=["m.onnx"], address=address))
    assert_clean_error(run_ferry("serve", "m.onnx", "--address", "garbage", env={"FERRY_API_KEY": ""}),
                       "--address 'garbage': expected auto", "ray://HOST:PORT", "or local (start a local Ray")


def test_non_finite_or_unbounded_numbers_are_refused_in_one_line(monkeypatch):
    """argparse's float() takes "inf" and "nan": each was accepted and then failed later (a traceback at
    start, a server whose every lone request timed out, a warm-up batch too large for memory)."""
    from ferry.core.errors import FerryError
    from ferry.serve.local import MAX_BATCH_SIZE, ServeOptions, check_options

    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    nan, inf = float("nan"), float("inf")
    cases = [({"max_body_mb": inf}, "--max-body-mb must be a finite number > 0"), ({"max_body_mb": nan}, "--max-body-mb"),
             ({"max_body_mb": 1e-9}, "--max-body-mb"),  # under one byte: every request would be a 413
             ({"drain_timeout_s": inf}, "--drain-timeout-s must be a finite number > 0"),
             ({"drain_timeout_s": nan}, "--drain-timeout-s"), ({"timeout_s": inf}, "--timeout-s must be a finite number"),
             ({"timeout_s": nan}, "--timeout-s"), ({"batch_wait_ms": inf}, "--batch-wait-ms must be a finite number"),
             ({"batch_wait_ms": nan}, "--batch-wait-ms must be a finite number"),
             ({"batch_wait_ms": 1e308}, "must be under the deadline"),
             ({"batch_wait_ms": 500, "timeout_s": 0.5}, "--batch-wait-ms 500 must be under the deadline, --timeout-s 0.5"),
             ({"max_batch_size": 100_000_000_000}, f"--max-batch-size must be 1-{MAX_BATCH_SIZE}"),
             ({"max_batch_size": 0}, "--max-batch-size")]
    for kwargs, needle in cases:
        with pytest.raises(FerryError) as info:
            check_options(ServeOptions(models=["m.onnx"], port=0, **kwargs))
        assert needle in str(info.value), (kwargs, str(info.value))
    with pytest.raises(FerryError) as info:  # every problem, in one line
        check_options(ServeOptions(models=["m.onnx"], port=0, max_body_mb=inf, drain_timeout_s=nan, timeout_s=inf,
                                   batch_wait_ms=nan, max_batch_size=10**11))
    message = str(info.value)
    assert "\n" not in message and all(flag in message for flag in (
        "--max-body-mb", "--drain-timeout-s", "--timeout-s", "--batch-wait-ms", "--max-batch-size"))
    # the edges that stay accepted
    check_options(ServeOptions(models=["m.onnx"], port=0, max_batch_size=MAX_BATCH_SIZE, batch_wait_ms=499, timeout_s=0.5,
                               max_body_mb=0.001, drain_timeout_s=0.1))
    proc = run_ferry("serve", "m.onnx", "--port", "0", "--max-body-mb", "inf", "--batch-wait-ms", "nan",
                     "--drain-timeout-s", "inf", env={"FERRY_API_KEY": ""})
    assert_clean_error(proc, "--max-body-mb", "--batch-wait-ms", "--drain-timeout-s")


def test_a_batch_too_large_to_warm_up_is_a_one_line_error():
    from types import SimpleNamespace

    from ferry.core.errors import FerryError
    from ferry.serve.backend import warm_up

    class Greedy:
        name, spec = "big", SimpleNamespace(input_shape=(3, 224, 224))

        def infer(self, x):
            if len(x) > 1:
                raise MemoryError("Unable to allocate")  # as numpy's ArrayMemoryError

    with pytest.raises(FerryError, match="big: not enough memory to warm it up at batch 4096: lower --max-batch-size"):
        warm_up(Greedy(), 4096)


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host,workers", [("127.0.0.1", 1), ("127.0.0.1", 2), ("::1", 1)])
def test_port_0_the_banner_shows_the_port_really_bound(cnn_export, tmp_path, host, workers):
    """--port 0 lets the system pick a free port; the banner used to say http://127.0.0.1:0."""
    import re

    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    out = tmp_path / "out.txt"
    with open(out, "w") as stdout, open(tmp_path / "err.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", str(cnn_export[0]), "--host", host, "--port", "0",
                                 "--workers", str(workers), "--threads", "1"], cwd=REPO, stdout=stdout, stderr=stderr,
                                text=True, env={**os.environ, "FERRY_API_KEY": ""})
    try:
        deadline = time.time() + 90
        found = None
        while found is None:
            assert proc.poll() is None and time.time() < deadline, (out.read_text(), (tmp_path / "err.txt").read_text())
            found = re.search(r"ferry serve: (http://(\[[0-9a-f:]+\]|[0-9.]+):(\d+))\s", out.read_text())
            time.sleep(0.05)
        url, shown_host, port = found.group(1), found.group(2), int(found.group(3))
        assert port != 0 and shown_host == (f"[{host}]" if ":" in host else host), found.group(0)
        while True:  # the banner's address answers
            try:
                if http("GET", url + "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.txt").read_text()
            time.sleep(0.1)
        assert http("POST", url + "/v1/models/mnist-cnn/predict", digit_png())[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, (tmp_path / "err.txt").read_text()


def test_a_sighup_while_the_models_load_does_not_kill_the_server(cnn_export):
    """SIGHUP reloads the models once the server runs; one that arrives while they load (a deploy
    script's reload racing a start) is ignored, not the default action, which ends the process."""
    code = ("import os, signal, sys\n"
            "import ferry.serve.local as local\n"
            "def loading(opts, log=None):\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    sys.exit(7)\n"
            "local.build_app = loading\n"
            f"local.serve_local(local.ServeOptions(models=[{str(cnn_export[0])!r}], port=0))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-2000:])  # -1 (killed by SIGHUP) before


def test_keys_come_from_the_environment_or_a_file_and_the_probes_are_open(cnn_export, tmp_path):
    model = cnn_export[0]
    secret = "s3cret-on-the-command-line"
    proc = run_ferry("serve", str(model), "--api-key", secret)
    assert_clean_error(proc, "--api-key is not accepted", "$FERRY_API_KEY", "--api-key-file")
    assert secret not in proc.stderr + proc.stdout
    assert_clean_error(run_ferry("serve", str(model), "--host", "0.0.0.0", "--port", str(free_port()),
                                 env={"FERRY_API_KEY": ""}), "give an API key")
    assert_clean_error(run_ferry("serve", str(model), "--api-key-file", str(tmp_path / "none")), "--api-key-file")
    assert_clean_error(run_ferry("serve", str(Path(model).with_name("none.onnx"))), "model not found")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    s = Server(model, args=["--api-key-file", str(key_file)])
    try:
        assert KEY not in Path(f"/proc/{s.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        predict = s.url + "/v1/models/mnist-cnn/predict"
        for path in ("/healthz", "/readyz"):  # probes answer a load balancer without the key
            assert http("GET", s.url + path)[0] == 200, path
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/stats"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("GET", "/docs"), ("POST", "/v1/admin/reload"), ("GET", "/nope")):
            status, body, headers = http(method, s.url + path)
            assert status == 401 and headers["www-authenticate"] == "Bearer" and "API key" in body["error"], path
        png = digit_png()
        assert http("POST", predict, png)[0] == 401
        assert http("POST", predict, png, {"Authorization": "Bearer wrong"})[0] == 401
        assert http("POST", predict, png, {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert http("POST", predict, png, {"X-API-Key": KEY})[0] == 200
        # request ids: echoed when valid, replaced when not
        status, body, headers = http("POST", predict, png, {**AUTH, "X-Request-ID": "lb-7f3a:01"})
        assert headers["x-request-id"] == body["request_id"] == "lb-7f3a:01"
        status, body, headers = http("POST", predict, png, {**AUTH, "X-Request-ID": "no spaces or {braces}"})
        assert status == 200 and headers["x-request-id"] == body["request_id"] != "no spaces or {braces}"
        assert len(headers["x-request-id"]) == 16
    finally:
        out, err = assert_clean_stop(s)
    assert KEY not in out + err and "API key required" in out


@contextlib.contextmanager
def inprocess(app):
    """`app` served by uvicorn in a thread of this process (no signals), stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_an_internal_error_is_a_500_logged_with_its_traceback_and_request_id(cnn_export, caplog):
    from ferry.serve.app import AppConfig, create_app
    from ferry.serve.backend import LocalBackend
    from ferry.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    backend = LocalBackend([cnn_export[0]], provider="cpu", threads=1, metrics=metrics)
    clf = backend.batchers["mnist-cnn"].clf
    working = clf.infer

    def broken(_batch):
        raise RuntimeError("the inference session fell over")

    app = create_app(backend, AppConfig(), metrics=metrics)
    predict = "/v1/models/mnist-cnn/predict"
    with inprocess(app) as url, caplog.at_level(logging.WARNING, logger="ferry.serve"):
        clf.infer = broken
        status, body, headers = http("POST", url + predict, digit_png(), {"X-Request-ID": "trace-me-42"})
        clf.infer = working
        after = http("POST", url + predict, digit_png())[0]
        bad = http("POST", url + predict + "?top_k=0", digit_png(), {"X-Request-ID": "bad-k-1"})[0]
    assert status == 500 and headers["x-request-id"] == body["request_id"] == "trace-me-42"
    assert "RuntimeError" in body["error"] and "trace-me-42" in body["error"] and after == 200 and bad == 400
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "trace-me-42" in errors[0].getMessage() and errors[0].exc_info is not None
    assert "the inference session fell over" in caplog.text and "Traceback" in caplog.text  # the traceback, logged
    assert any("bad-k-1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)  # 4xx: one line
    page = metrics.render().decode()
    assert 'ferry_requests_total{code="500",model="mnist-cnn"} 1.0' in page
    assert 'ferry_requests_total{code="400",model="mnist-cnn"} 1.0' in page


def multipart(*files: tuple[str, bytes]) -> tuple[bytes, dict]:
    """A multipart/form-data body of (field name, file bytes) pairs, and its Content-Type header."""
    boundary = "ferryboundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{i}.png\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, (field, data) in enumerate(files))
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_multipart_body_with_several_files_is_a_400_not_an_answer_for_one(cnn_export):
    """curl -F file=@a.png -F file=@b.png used to get the answer for one of the two, silently."""
    from ferry.serve.app import AppConfig, create_app
    from ferry.serve.backend import LocalBackend

    png = digit_png()
    with inprocess(create_app(LocalBackend([cnn_export[0]], provider="cpu", threads=1), AppConfig())) as url:
        predict = url + "/v1/models/mnist-cnn/predict"
        for files in ([("file", png), ("file", png)], [("image", png), ("file", png)], [("image", png)] * 3):
            status, body, _ = http("POST", predict, *multipart(*files))
            assert status == 400 and f"{len(files)} file fields: send one image per request" in body["error"], body
        status, body, _ = http("POST", predict + "?top_k=2", *multipart(("file", png)))
        assert status == 200 and len(body["top_k"]) == 2
        # a browser form's second file input left unselected: a part with no file name and nothing in it
        data, headers = multipart(("image", png))
        empty = (b'--ferryboundary\r\nContent-Disposition: form-data; name="other"; filename=""\r\n'
                 b"Content-Type: application/octet-stream\r\n\r\n\r\n")
        status, body, _ = http("POST", predict, empty + data, headers)
        assert status == 200 and "index" in body, body


def test_query_parameters_that_do_not_apply_are_a_400_not_ignored(cnn_export, detector_export):
    """Query parameters for the other kind of model (top_k on a detector, min_score on a classifier)
    and unknown ones are a 400 naming them, as `ferry predict` refuses --top-k and --min-score; the
    OpenAPI description lists a query parameter only where a model takes it."""
    from ferry.serve.app import AppConfig, create_app
    from ferry.serve.backend import LocalBackend
    from ferry.serve.openapi import openapi_spec

    backend = LocalBackend([cnn_export[0], detector_export["path"]], provider="cpu", threads=1)
    png = digit_png()
    scene = (detector_export["scenes"] / "val" / "000001.png").read_bytes()
    with inprocess(create_app(backend, AppConfig())) as url:
        clf, det = url + "/v1/models/mnist-cnn/predict", url + "/v1/models/digits/predict"
        for target, query, needle in (
                (det, "top_k=3", "query parameter top_k is for classifiers; digits is a detector (use min_score)"),
                (clf, "min_score=0.5", "query parameter min_score is for detectors; mnist-cnn is a classifier (use top_k)"),
                (clf, "topk=3", "unknown query parameter 'topk'"), (clf, "top_k=2&x=1", "unknown query parameter 'x'"),
                (det, "min_score=0.5&foo=1&bar", "unknown query parameters 'bar', 'foo'"), (clf, "TOP_K=2", "'TOP_K'")):
            status, body, _ = http("POST", f"{target}?{query}", png)
            assert status == 400 and needle in body["error"] and "\n" not in body["error"], (query, status, body)
        status, body, _ = http("POST", clf + "?top_k=3", png)  # each where it belongs
        assert status == 200 and len(body["top_k"]) == 3
        status, body, _ = http("POST", det + "?min_score=0.25", scene)
        assert status == 200 and body["min_score"] == 0.25
        spec = http("GET", url + "/openapi.json")[1]

    def query_params(doc):
        return {p["name"] for p in doc["paths"]["/v1/models/{name}/predict"]["post"]["parameters"] if p.get("in") == "query"}

    assert query_params(spec) == {"top_k", "min_score"}
    common = dict(auth=False, max_body_bytes=2**20, max_top_k=100, max_queue=16, timeout_s=10.0)
    assert query_params(openapi_spec(["mnist-cnn"], **common)) == {"top_k"}
    assert query_params(openapi_spec(["digits"], detectors=["digits"], **common)) == {"min_score"}


def test_overload_is_shed_at_once_with_503_and_the_metrics_count_exactly(cnn_export):
    """The short version of `python -m ferry.bench.loadtest --overload`: 24 clients that retry at once
    against a queue of 4; every answer is 200 or 503 (no reset, no other 5xx), and /metrics counts
    exactly what the clients got."""
    from ferry.bench.loadtest import Level, request_counts, run_level, scrape

    s = Server(cnn_export[0], args=["--max-queue", "4"], env={"FERRY_API_KEY": KEY})
    try:
        bodies = [digit_png()]
        url = s.url + "/v1/models/mnist-cnn/predict"
        result: dict = {}
        level = Level("closed", 24, 0, seconds=3.0)
        load = threading.Thread(target=lambda: result.update(asyncio.run(
            run_level(url, bodies, level, api_key=KEY, honour_retry_after=False))))
        load.start()
        probes: dict[str, int] = {}
        refused = None
        deadline = time.time() + 10
        while refused is None and time.time() < deadline:
            status, body, headers = http("POST", url, bodies[0], AUTH)
            probes[str(status)] = probes.get(str(status), 0) + 1
            if status == 503:
                refused = (body, headers)
        load.join(60)
        assert refused is not None, probes
        body, headers = refused
        assert headers["retry-after"] == "1" and "--max-queue" in body["error"] and headers["x-request-id"]
        statuses = result["statuses"]
        assert set(statuses) <= {"200", "503"}, statuses  # no reset, no other 5xx, nothing past the deadline
        assert statuses.get("200", 0) > 0 and statuses.get("503", 0) > 0, statuses
        sent = {k: statuses.get(k, 0) + probes.get(k, 0) for k in {*statuses, *probes}}
        assert request_counts(scrape(s.url, KEY), "mnist-cnn") == sent
        assert metric(s.url, "ferry_requests_in_flight", AUTH, model="mnist-cnn") == 0
        assert metric(s.url, "ferry_queue_depth", AUTH, model="mnist-cnn") == 0
        computed = metric(s.url, "ferry_batch_size_sum", AUTH, model="mnist-cnn")
        assert computed == sent["200"] and http("GET", s.url + "/v1/stats", headers=AUTH)[1]["models"]["mnist-cnn"][
            "requests"] == sent["200"]
    finally:
        assert_clean_stop(s)


def test_past_its_deadline_a_request_gets_504_and_its_work_is_dropped(resnet_export):
    s = Server(resnet_export.paths["fp32"], args=["--timeout-s", "0.1", "--max-queue", "64"])
    try:
        photo = photo_png()
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda _: http("POST", s.url + "/v1/models/resnet50/predict", photo), range(16)))
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 504} and 504 in statuses, statuses  # ResNet-50: ~35 ms an image on 2 cores
        late = next(a for a in answers if a[0] == 504)
        assert "--timeout-s" in late[1]["error"] and late[1]["request_id"] == late[2]["x-request-id"]
        computed = metric(s.url, "ferry_batch_size_sum", model="resnet50")
        assert computed < 16, computed  # the requests still queued at their deadline were never computed
        assert metric(s.url, "ferry_requests_total", model="resnet50", code="504") == statuses.count(504)
        assert http("GET", s.url + "/readyz")[0] == 200
    finally:
        assert_clean_stop(s)


def test_a_504_keeps_its_place_until_its_decode_has_finished(cnn_export):
    """A thread cannot be stopped: a request past its deadline gets its 504 on time, but its place among
    the model's --max-queue stays taken until its image decode has finished (it used to be given back
    at once, so a flood of slow decodes ran more decodes at once than the server admits requests)."""
    from ferry.serve.app import AppConfig, ServerState, create_app
    from ferry.serve.backend import LocalBackend

    backend = LocalBackend([cnn_export[0]], provider="cpu", threads=1)
    clf = backend.batchers["mnist-cnn"].clf
    real, gate, lock = clf.prepare, threading.Event(), threading.Lock()
    decodes = {"running": 0, "most": 0, "started": 0}

    def slow(data, name="image"):  # a decode that lasts until the test lets it finish
        with lock:
            decodes["running"] += 1
            decodes["started"] += 1
            decodes["most"] = max(decodes["most"], decodes["running"])
        try:
            gate.wait(60)
            return real(data, name)
        finally:
            with lock:
                decodes["running"] -= 1

    clf.prepare = slow
    state = ServerState()
    png = digit_png()
    with inprocess(create_app(backend, AppConfig(max_queue=2, timeout_s=0.3), state=state)) as url:
        predict = url + "/v1/models/mnist-cnn/predict"
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                late = list(pool.map(lambda _: http("POST", predict, png), range(2)))
            assert [a[0] for a in late] == [504, 504] and "--timeout-s" in late[0][1]["error"], late
            assert decodes["running"] == 2 and state.pending["mnist-cnn"] == 2  # answered, their decodes still run
            with ThreadPoolExecutor(max_workers=4) as pool:  # a flood while both decodes run: refused at once
                flood = list(pool.map(lambda _: http("POST", predict, png), range(4)))
            assert [a[0] for a in flood] == [503] * 4 and all(a[2]["retry-after"] == "1" for a in flood), flood
            assert decodes["started"] == 2 and decodes["most"] == 2
        finally:
            gate.set()
        deadline = time.time() + 30
        while state.pending["mnist-cnn"] and time.time() < deadline:  # the decodes finish: their places come back
            time.sleep(0.02)
        assert state.pending["mnist-cnn"] == 0 and decodes["running"] == 0
        clf.prepare = real
        assert [http("POST", predict, png)[0] for _ in range(3)] == [200] * 3
    assert decodes["most"] == 2


def test_a_place_is_given_back_once_whether_its_work_ran_failed_or_never_started():
    """`_Place`: held by the request and by each piece of work in a thread; given back exactly once,
    when the last lets go: work that ran past the request's cancellation, work that raised, and work
    cancelled while still queued behind a busy executor (it then never runs)."""
    from ferry.serve.app import _Place

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        said: list[str] = []
        gate, running = threading.Event(), threading.Event()
        # 1. cancelled while its work runs: given back when the work returns, not before
        late = _Place(lambda: said.append("late"))
        task = asyncio.ensure_future(late.in_thread(lambda: running.set() or gate.wait(30)))
        while not running.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        late.drop()
        # 2. queued behind it, cancelled before it ran: given back at once, and it never runs
        queued = _Place(lambda: said.append("queued"))
        task = asyncio.ensure_future(queued.in_thread(lambda: said.append("ran")))
        await asyncio.sleep(0.01)  # submitted, behind the busy thread
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        queued.drop()
        assert said == ["queued"], said
        gate.set()
        for _ in range(500):
            if "late" in said:
                break
            await asyncio.sleep(0.01)
        # 3. work that raises: its error reaches the request, the place comes back once
        failed = _Place(lambda: said.append("failed"))
        with pytest.raises(ValueError, match="undecodable"):
            await failed.in_thread(lambda: (_ for _ in ()).throw(ValueError("undecodable")))
        failed.drop()
        return said

    assert asyncio.run(scenario()) == ["queued", "late", "failed"]


def test_sigterm_drains_in_flight_requests_finish_new_ones_get_503(resnet_export):
    s = Server(resnet_export.paths["fp32"], args=["--max-batch-size", "1", "--max-queue", "32", "--timeout-s", "60",
                                                  "--drain-timeout-s", "15"])
    photo = photo_png()
    url = s.url + "/v1/models/resnet50/predict"
    with ThreadPoolExecutor(max_workers=8) as pool:
        in_flight = [pool.submit(http, "POST", url, photo) for _ in range(8)]
        deadline = time.time() + 30
        while metric(s.url, "ferry_requests_in_flight", model="resnet50") < 8 and time.time() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        ready = http("GET", s.url + "/readyz")  # 8 ResNet-50 calls, one at a time: the drain lasts a while
        new = http("POST", url, photo)
        alive = http("GET", s.url + "/healthz")[0]
        finished = [f.result(timeout=120)[0] for f in in_flight]
    assert ready[0] == 503 and ready[1]["status"] == "draining"
    assert new[0] == 503 and new[2]["retry-after"] == "15" and new[2]["connection"] == "close" and "stopping" in new[1]["error"]
    assert alive == 200 and finished == [200] * 8
    out, _ = assert_clean_stop(s, within=15)
    assert "draining" in out


def test_reload_under_load_loses_no_request_and_a_bad_file_keeps_the_old_model(cnn_export, tmp_path):
    model = tmp_path / "digits.onnx"
    shutil.copy(cnn_export[0], model)
    s = Server(model, env={"FERRY_API_KEY": KEY})
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        png = digit_png()
        while not stop.is_set():
            statuses.append(http("POST", s.url + "/v1/models/mnist-cnn/predict", png, AUTH)[0])

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        status, body, _ = http("POST", s.url + "/v1/admin/reload", b"", AUTH)
        assert status == 200 and body["status"] == "reloaded" and body["generation"] == 1, body
        assert body["models"][0]["name"] == "mnist-cnn" and body["models"][0]["path"] == str(model)
        s.proc.send_signal(signal.SIGHUP)  # the same, by signal
        deadline = time.time() + 30
        while metric(s.url, "ferry_model_reloads_total", AUTH, result="ok") < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert metric(s.url, "ferry_model_reloads_total", AUTH, result="ok") == 2
        model.write_bytes(b"this is not an ONNX model")
        status, body, _ = http("POST", s.url + "/v1/admin/reload", b"", AUTH)
        assert status == 409 and "digits.onnx" in body["error"] and "still serving the previous models" in body["error"]
        n = len(statuses)
        deadline = time.time() + 30
        while len(statuses) < n + 20 and time.time() < deadline:
            time.sleep(0.05)  # the previous model still answers
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        out, err = assert_clean_stop(s)
    assert len(statuses) > 40 and set(statuses) == {200}, sorted(set(statuses))
    assert "SIGHUP: reloaded mnist-cnn" in out and "digits.onnx" in err and "409" in err


def test_workers_share_one_metrics_page_reload_together_and_stop_cleanly(cnn_export):
    s = Server(cnn_export[0], args=["--workers", "2", "--threads", "1"], env={"FERRY_API_KEY": KEY})
    try:
        png = digit_png()
        with ThreadPoolExecutor(max_workers=4) as pool:  # urllib opens a connection per request: both workers answer
            statuses = list(pool.map(lambda _: http("POST", s.url + "/v1/models/mnist-cnn/predict", png, AUTH)[0],
                                     range(60)))
        assert statuses == [200] * 60
        for _ in range(4):  # whichever worker answers the scrape, the page sums both
            assert metric(s.url, "ferry_requests_total", AUTH, model="mnist-cnn", code="200") == 60
        assert http("GET", s.url + "/v1/stats", headers=AUTH)[1]["models"]["mnist-cnn"]["requests"] == 60
        status, body, _ = http("POST", s.url + "/v1/admin/reload", b"", AUTH)
        assert status == 200 and body["status"] == "reloaded", body
        deadline = time.time() + 30
        while metric(s.url, "ferry_model_reloads_total", AUTH, result="ok") < 2 and time.time() < deadline:
            time.sleep(0.1)
        reloads = metric(s.url, "ferry_model_reloads_total", AUTH, result="ok")
    finally:
        out, err = assert_clean_stop(s)
    assert reloads == 2, (reloads, out[-2000:], err[-2000:])  # both workers reloaded


# --- Schemathesis against the live server ------------------------------------------------------

FUZZ_EXAMPLES = 10  # per operation and generation mode (positive, negative): ~180 requests in all


def test_the_live_server_conforms_to_its_openapi_description(cnn_export):
    """Schemathesis (a real OpenAPI fuzzer) against a live server, from the server's own
    /openapi.json: valid and invalid requests for every operation; zero 5xx, and every status code,
    header and body as the description says. All of Schemathesis's checks but one:
    `positive_data_acceptance` would require any bytes the schema can call `format: binary` to be a
    decodable image, which no schema can say."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    s = Server(cnn_export[0], args=["--max-body-mb", "1"], env={"FERRY_API_KEY": KEY})
    seen: dict[str, set] = {}
    try:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json", headers=AUTH)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8  # (Schemathesis leaves out the description's own path)
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    response = case.call_and_validate(base_url=s.url, headers=AUTH,
                                                      excluded_checks=[positive_data_acceptance])
                    seen.setdefault(operation.label, set()).add(response.status_code)

                try:
                    fuzz()
                except Unsatisfiable:  # nothing in this operation can be made invalid (a GET without parameters)
                    assert mode == GenerationMode.NEGATIVE, operation.label
    finally:
        assert_clean_stop(s)
    print("statuses seen per operation:", {k: sorted(v) for k, v in seen.items()})
    assert 400 in seen["POST /v1/models/{name}/predict"] and len(seen) == len(operations)


# --- Ray Serve ---------------------------------------------------------------------------------

def test_on_ray_serve_a_models_failure_fails_its_own_requests_only():
    """Ray Serve's @serve.batch fails every request of a batch when the batch function raises, and one
    batch may hold several models' requests: a model whose call fails hands the error to its own
    requests (which raise it), the other model's requests get their logits."""
    from ferry.serve.ray_host import RayEntry, _deployment_class

    class Gauge:
        def __init__(self):
            self.value = 0

        def inc(self, n=1):
            self.value += n

        def dec(self, n=1):
            self.value -= n

    class Owner:
        def __init__(self):
            self.batches = []
            self.metrics = self

        def gauge(self, kind, name):
            return Gauge()

        def batch(self, name, n):
            self.batches.append((name, n))

    class Model:
        def __init__(self, fails):
            self.fails = fails

        def infer(self, x):
            if self.fails:
                raise RuntimeError("CUDA out of memory")
            return x * 2

    owner = Owner()
    good, bad = RayEntry(owner, "good", Model(False)), RayEntry(owner, "bad", Model(True))
    items = [(bad, np.ones(3, np.float32), [False]), (good, np.arange(3, dtype=np.float32), [False]),
             (good, np.full(3, 5, np.float32), [False])]
    batched = _deployment_class().func_or_class._batched.__wrapped__  # what @serve.batch calls with a batch
    out = asyncio.run(batched(owner, items))  # returns, does not raise
    assert isinstance(out[0], RuntimeError)
    assert np.array_equal(out[1], [0, 2, 4]) and np.array_equal(out[2], [10, 10, 10])
    assert owner.batches == [("good", 2)] and all(taken[0] for _, _, taken in items)

    async def answer(value):
        return value

    owner._batched = lambda item: answer(out[0] if item[0] is bad else out[1])
    depths = bad.depth.value, good.depth.value
    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(bad.submit(np.ones(3, np.float32)))
    assert np.array_equal(asyncio.run(good.submit(np.ones(3, np.float32))), [0, 2, 4])
    assert (bad.depth.value, good.depth.value) == depths  # not taken by a batch here: submit releases its count


@pytest.mark.slow
def test_ray_serve_two_replicas_same_answers_stats_metrics_and_reload(ray_local, cnn_export, tmp_path):
    """The same app deployed on Ray Serve (the session's local Ray) with 2 replicas and @serve.batch:
    --threads honoured, /v1/stats and /metrics summed over both replicas, reload on both."""
    from ray import serve

    from ferry.core.errors import FerryError
    from ferry.runtime import Classifier
    from ferry.serve.local import ServeOptions
    from ferry.serve.ray_host import APP_NAME, _control, _replaced, deploy, undeploy

    port = free_port()
    url, ours = deploy(ServeOptions(models=[str(cnn_export[0])], port=port, replicas=2, max_batch_size=8, batch_wait_ms=5,
                                    threads=2), cpus_per_replica=0.5)
    try:
        files = write_digit_pngs(tmp_path / "d", 32, seed=12)
        clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda f: (f, http("POST", f"{url}/v1/models/mnist-cnn/predict?top_k=2",
                                                          f.read_bytes())), files * 2))
        for f, (status, body, headers) in answers:
            want = clf.predict(f)
            assert status == 200 and body["index"] == want.index and abs(body["probability"] - want.probability) <= 1e-6
            assert headers["x-request-id"] == body["request_id"]
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", b"not an image")[0] == 400
        models = http("GET", f"{url}/v1/models")[1]["models"]
        assert models[0]["name"] == "mnist-cnn" and models[0]["threads"] == 2
        status = serve.status().applications[APP_NAME]
        deployment = next(iter(status.deployments))
        assert status.deployments[deployment].replica_states.get("RUNNING") == 2
        deadline = time.time() + 30  # the other replica's figures arrive with its next heartbeat
        while metric(url, "ferry_requests_total", model="mnist-cnn", code="200") < 64 and time.time() < deadline:
            time.sleep(0.2)
        assert metric(url, "ferry_replicas") == 2
        assert metric(url, "ferry_requests_total", model="mnist-cnn", code="200") == 64
        assert metric(url, "ferry_batch_size_sum", model="mnist-cnn") == 64
        assert http("GET", f"{url}/v1/stats")[1]["models"]["mnist-cnn"]["requests"] == 64
        status, body, _ = http("POST", f"{url}/v1/admin/reload", b"")
        assert status == 200 and body["status"] == "reloaded", body
        deadline = time.time() + 30
        while metric(url, "ferry_model_reloads_total", result="ok") < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert metric(url, "ferry_model_reloads_total", result="ok") == 2
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", files[0].read_bytes())[0] == 200
        # Serve keeps the address it started with: another is refused, and the running app is untouched
        other = free_port()
        with pytest.raises(FerryError, match=f"already serves HTTP at 127.0.0.1:{port} .*give --host 127.0.0.1 --port {port}"):
            deploy(ServeOptions(models=[str(cnn_export[0])], port=other, replicas=1), cpus_per_replica=0.5)
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", files[0].read_bytes())[0] == 200
        # a second ferry app on the same Serve (one name, one route prefix) used to replace the first silently:
        # refused in one line naming the running one, from the library and from the command line (exit 2) ...
        second = ServeOptions(models=[str(cnn_export[0])], port=port, replicas=1)
        running = (r"already runs ferry's application 'ferry' \(RUNNING; models mnist-cnn, deployed by `ferry serve` "
                   rf"\(pid {os.getpid()} on .*\)\): a second deployment would replace it; .*give --replace")
        with pytest.raises(FerryError, match=running):
            deploy(second, cpus_per_replica=0.5)
        proc = run_ferry("serve", str(cnn_export[0]), "--address", ray_local.get_runtime_context().gcs_address,
                         "--port", str(port), env={"FERRY_API_KEY": ""}, timeout=120)
        assert_clean_error(proc, "already runs ferry's application 'ferry' (RUNNING; models mnist-cnn", "--replace")
        assert serve.status().applications[APP_NAME].deployments[deployment].replica_states.get("RUNNING") == 2
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", files[0].read_bytes())[0] == 200
        # ... unless asked to replace it; the replaced `ferry serve` sees its control actor gone (and exits)
        assert ours == _control() and not _replaced(ours)
        _, theirs = deploy(dataclasses.replace(second, replace=True), cpus_per_replica=0.5)
        assert _replaced(ours) and not _replaced(theirs) and theirs == _control()
        undeploy(ours)  # the replaced deployment's stop leaves the new app alone
        deadline = time.time() + 60
        while time.time() < deadline:
            app = serve.status().applications[APP_NAME]
            if app.status == "RUNNING" and app.deployments[deployment].replica_states == {"RUNNING": 1}:
                break
            time.sleep(0.2)
        assert app.status == "RUNNING" and app.deployments[deployment].replica_states == {"RUNNING": 1}, app
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", files[0].read_bytes())[0] == 200
    finally:
        undeploy()


@pytest.mark.slow
def test_ferry_serve_replaced_by_another_exits_and_leaves_the_new_app_serving(ray_local, cnn_export):
    """`ferry serve --address` whose app another deployment with --replace takes over: it sees its
    control actor gone, says so and exits 0 without draining or deleting the app now serving (it would
    otherwise delete the new app when it is stopped later)."""
    from ray.serve.context import _get_global_client

    from ferry.serve.local import ServeOptions
    from ferry.serve.ray_host import deploy, undeploy

    client = _get_global_client(raise_if_no_controller_running=False)
    port = client.http_config.port if client is not None else free_port()  # Serve keeps the port it started with
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", str(cnn_export[0]), "--address",
                             ray_local.get_runtime_context().gcs_address, "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "FERRY_API_KEY": ""})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and "Ctrl-C or SIGTERM stops it" not in (
                line := proc.stdout.readline()):
            pass
        assert proc.poll() is None and "on Ray Serve" in line, proc.stderr.read() if proc.poll() is not None else line
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", digit_png())[0] == 200
        deploy(ServeOptions(models=[str(cnn_export[0])], port=port, replicas=1, replace=True), cpus_per_replica=0.5)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "the app was replaced by another `ferry serve --replace`" in out, (out, err)
        assert "Traceback" not in err, err
        deadline = time.time() + 60
        while time.time() < deadline and http("GET", f"{url}/readyz")[0] != 200:
            time.sleep(0.2)
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", digit_png())[0] == 200  # the new app, untouched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        undeploy()


@pytest.mark.slow
def test_ray_serve_host_stops_under_load_within_the_drain_timeout(cnn_export):
    """`ferry serve --address local` (its own local Ray), SIGTERM to its whole process group (as Ctrl-C
    or a supervisor would send it) while clients are sending: in-flight requests finish, new ones get
    503 (or, once it is gone, a refused connection), the process exits 0 within --drain-timeout-s and
    nothing is logged as an error (formerly: ~60 s and "Failed to connect to GCS within 60 seconds")."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", str(cnn_export[0]), "--address", "local",
                             "--port", str(port), "--replicas", "1", "--drain-timeout-s", "15"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "FERRY_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if http("GET", url + "/readyz", timeout=5)[0] == 200:
                    break
            time.sleep(0.5)
        assert proc.poll() is None and http("GET", url + "/readyz")[0] == 200, proc.stderr.read() if proc.poll() else ""
        outcomes: list = []
        stop = threading.Event()
        png = digit_png()

        def client() -> None:  # a well-behaved client: after a 503 it waits the Retry-After (draining: 15 s)
            while not stop.is_set():
                try:
                    status, _, headers = http("POST", url + "/v1/models/mnist-cnn/predict", png, timeout=30)
                except OSError as exc:
                    outcomes.append(("after-exit" if isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                                     else repr(exc), time.monotonic()))
                    return
                outcomes.append((status, time.monotonic()))
                if status == 503:
                    stop.wait(float(headers.get("retry-after", 1)))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t_sig = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped_after = time.monotonic() - t_sig
        stop.set()
        for t in threads:
            t.join(60)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0 and stopped_after < 15, (code, stopped_after, err)
    assert "Failed to connect" not in err and "Traceback" not in err and " E " not in err and "ERROR" not in err, err
    kinds = {o for o, _ in outcomes}
    assert kinds <= {200, 503, "after-exit"}, outcomes
    assert sum(o == 200 for o, t in outcomes if t < t_sig) > 0
    assert "stopped by SIGTERM after the requests in flight" in out, out


def test_triton_repository_fits_tritons_schema(cnn_export, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from ferry.core.errors import FerryError
    from ferry.export.triton import config_pbtxt, validate_config, write_repository
    from ferry.runtime import contract

    path = cnn_export[0]
    meta = contract.read(path)
    folder = write_repository(path, meta, tmp_path / "repo", max_batch_size=32, tensorrt_fp16=True)
    assert (folder / "1" / "model.onnx").read_bytes() == Path(path).read_bytes()
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "mnist-cnn" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 32
    assert cfg.input[0].name == "input" and list(cfg.input[0].dims) == [1, 28, 28]
    assert cfg.output[0].name == "logits" and list(cfg.output[0].dims) == [10]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert "TYPE_FP32" in config_pbtxt(meta, name="x")
    with pytest.raises(FerryError, match="model-config schema"):
        validate_config(config_pbtxt(meta, name="x").replace("max_batch_size", "max_batch_sise"))
    proc = run_ferry("export", "resnet18", "--weights", "none", "--out", str(tmp_path / "m"), "--triton-repo",
                     str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stderr
    assert "docker run --gpus all" in proc.stdout and (tmp_path / "repo" / "resnet18" / "config.pbtxt").is_file()
