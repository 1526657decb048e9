"""`ferry serve` over real HTTP on 127.0.0.1: answers equal `ferry predict`, bad input is a 4xx and the
server keeps serving, API keys, SIGTERM finishes requests in flight, a bounded soak; Ray Serve with
2 replicas on the session's Ray; and the Triton model repository against Triton's own schema."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
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


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Server:
    def __init__(self, *models, args=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", *map(str, models), "--port", str(self.port),
                                      *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                if http("GET", self.url + "/healthz", headers=self.auth)[0] in (200, 401):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start")

    auth: dict = {}

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@pytest.fixture
def server(cnn_export, resnet_export):
    s = Server(cnn_export[0], resnet_export.paths["fp32"], args=["--max-body-mb", "2"])
    yield s
    code, _, err = s.stop()
    assert code == 0 and "Traceback" not in err, err


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
    for name, (status, body) in answers:
        want = expected[name]
        assert status == 200 and body["model"] == "mnist-cnn" and body["index"] == want.index
        assert abs(body["probability"] - want.probability) <= 1e-6
        assert [c["index"] for c in body["top_k"]] == [c.index for c in want.top_k]
        assert body["provider"] == "CPUExecutionProvider" and body["latency_ms"] > 0
    status, stats = http("GET", server.url + "/v1/stats")
    assert status == 200 and stats["models"]["mnist-cnn"]["requests"] >= 96


def test_the_api_lists_models_and_takes_multipart(server):
    status, body = http("GET", server.url + "/v1/models")
    by_name = {m["name"]: m for m in body["models"]}
    assert status == 200 and set(by_name) == {"mnist-cnn", "resnet50"}
    assert by_name["resnet50"]["labels"][281] == "tabby cat" and by_name["mnist-cnn"]["preprocess"]["kind"] == "mnist"
    assert by_name["resnet50"]["precision"] == "fp32" and by_name["resnet50"]["untrained"] is True
    assert http("GET", server.url + "/readyz")[1]["models"] == ["mnist-cnn", "resnet50"]
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo, "JPEG")
    boundary = "ferryboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    status, pred = http("POST", server.url + "/v1/models/resnet50/predict?top_k=5", multipart,
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and len(pred["top_k"]) == 5 and pred["model"] == "resnet50"
    raw = http("POST", server.url + "/v1/models/resnet50/predict?top_k=5", photo.getvalue())[1]
    assert raw["index"] == pred["index"] and abs(raw["probability"] - pred["probability"]) < 1e-9


def test_bad_requests_are_4xx_one_line_and_the_server_keeps_serving(server, tmp_path):
    folder = write_bad_images(tmp_path / "bad")
    predict = server.url + "/v1/models/mnist-cnn/predict"
    expected_status = {"h_bomb.png": 413}
    for name, needle in {**BAD_IMAGES, "d_empty.png": "empty body"}.items():
        status, body = http("POST", predict, (folder / name).read_bytes())
        assert status == expected_status.get(name, 400) and needle in body["error"], (name, status, body)
        assert "\n" not in body["error"]
    # over --max-body-mb 2: refused from the Content-Length, before the body is read
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/models/mnist-cnn/predict")
    conn.putheader("Content-Length", str(3 * 2**20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()
    assert http("POST", server.url + "/v1/models/nope/predict", b"x")[0] == 404
    assert http("POST", predict + "?top_k=0", (folder / "a_good.png").read_bytes())[0] == 400
    assert http("POST", predict + "?top_k=abc", (folder / "a_good.png").read_bytes())[0] == 400
    assert http("POST", predict, b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"})[0] == 400
    status, body = http("POST", predict, (folder / "a_good.png").read_bytes())
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
        status, _ = http("POST", server.url + "/v1/models/mnist-cnn/predict", body)
        return status == want if want else 400 <= status < 500

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, range(2000)))
    rss_after = server.rss_mb()
    print(f"soak: 2000 requests, RSS {rss_before:.1f} MiB before, {rss_after:.1f} MiB after")
    assert all(results)
    assert rss_after - rss_before < 40, (rss_before, rss_after)


def test_sigterm_finishes_the_requests_in_flight(resnet_export):
    s = Server(resnet_export.paths["fp32"])
    photo = io.BytesIO()
    Image.fromarray(np.full((256, 256, 3), 120, np.uint8)).save(photo, "PNG")

    def ask(_):
        return http("POST", s.url + "/v1/models/resnet50/predict", photo.getvalue())[0]

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(ask, i) for i in range(6)]
        time.sleep(0.3)  # the requests are in flight (ResNet-50 takes tens of ms each on 2 cores)
        s.proc.send_signal(signal.SIGTERM)
        statuses = [f.result(timeout=120) for f in futures]
    code, _, err = s.stop()
    assert statuses == [200] * 6 and code == 0 and "Traceback" not in err


def test_api_key_and_safe_binding(cnn_export):
    model = cnn_export[0]
    assert_clean_error(run_ferry("serve", str(model), "--host", "0.0.0.0", "--port", str(free_port()),
                                 env={"FERRY_API_KEY": ""}), "give an API key")
    assert_clean_error(run_ferry("serve", str(Path(model).with_name("none.onnx"))), "model not found")
    s = Server(model, args=["--api-key", "s3cret"])
    try:
        predict = s.url + "/v1/models/mnist-cnn/predict"
        digit = np.zeros((28, 28), np.uint8)
        digit[6:22, 12:16] = 255
        buf = io.BytesIO()
        Image.fromarray(digit).save(buf, "PNG")
        assert http("POST", predict, buf.getvalue())[0] == 401
        assert http("GET", s.url + "/v1/models")[0] == 401
        assert http("POST", predict, buf.getvalue(), {"Authorization": "Bearer wrong"})[0] == 401
        assert http("POST", predict, buf.getvalue(), {"Authorization": "Bearer s3cret"})[0] == 200
        assert http("POST", predict, buf.getvalue(), {"X-API-Key": "s3cret"})[0] == 200
    finally:
        code, _, err = s.stop()
    assert code == 0 and "Traceback" not in err


@pytest.mark.slow
def test_ray_serve_two_replicas_same_answers(ray_local, cnn_export, tmp_path):
    """The same app deployed on Ray Serve (the session's local Ray) with 2 replicas and @serve.batch."""
    from ray import serve

    from ferry.runtime import Classifier
    from ferry.serve.local import ServeOptions
    from ferry.serve.ray_host import APP_NAME, deploy

    port = free_port()
    url = deploy(ServeOptions(models=[str(cnn_export[0])], port=port, replicas=2, max_batch_size=8, batch_wait_ms=5),
                 cpus_per_replica=0.5)
    try:
        files = write_digit_pngs(tmp_path / "d", 32, seed=12)
        clf = Classifier.from_onnx(cnn_export[0], provider="cpu")
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda f: (f, http("POST", f"{url}/v1/models/mnist-cnn/predict?top_k=2",
                                                          f.read_bytes())), files))
        for f, (status, body) in answers:
            want = clf.predict(f)
            assert status == 200 and body["index"] == want.index and abs(body["probability"] - want.probability) <= 1e-6
        assert http("POST", f"{url}/v1/models/mnist-cnn/predict", b"not an image")[0] == 400
        assert http("GET", f"{url}/v1/models")[1]["models"][0]["name"] == "mnist-cnn"
        status = serve.status().applications[APP_NAME]
        replicas = next(iter(status.deployments.values())).replica_states
        assert replicas.get("RUNNING") == 2
    finally:
        serve.delete(APP_NAME)


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
