"""`ferry batch` with object storage, on a cluster that shares no disk, through a crash: against a real
S3-compatible store (SeaweedFS on 127.0.0.1, the `s3_store` fixture) and a two-node Ray cluster on
127.0.0.1 whose worker node runs in its own mount namespace (a private /tmp, a read-only root: it
shares no writable disk with the driver and cannot see the driver's folders)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BAD_IMAGES, REPO, assert_clean_error, free_port, run_ferry, write_bad_images, write_digit_pngs

pytest.importorskip("ray")
pytest.importorskip("pyarrow.parquet")

NAMESPACE_SETUP = "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm && mount -o remount,bind,ro / && exec \"$@\""


def isolation_unavailable() -> str | None:
    """Why a worker node cannot get its own mount namespace here (None: it can)."""
    if os.geteuid() != 0:
        return "a worker node without the driver's disk needs root (unshare --mount); not root here"
    if shutil.which("unshare") is None:
        return "a worker node without the driver's disk needs unshare (util-linux), which is not installed"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SETUP, "sh", "true"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"cannot make a private mount namespace here (unshare --mount): {proc.stderr.strip()[:200]}"
    return None


def start_node(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def node_info(proc: subprocess.Popen, timeout: float = 180) -> dict:
    """A node's JSON line (tests/ray_node.py), once it is up."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        proc.kill()
        raise RuntimeError(f"Ray node did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timed out'}")
    return json.loads(line[0])


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@dataclass
class Cluster:
    address: str
    driver_env: dict  # what a driver needs: the job's credentials; Ray kept on 127.0.0.1
    isolated: bool  # the worker node shares no writable disk with the driver and cannot see its folders
    why_not: str | None = None
    procs: list = field(default_factory=list)


@pytest.fixture(scope="module")
def s3_cluster(s3_store, tmp_path_factory):
    """A head node (1 CPU) and a worker node (1 CPU) on 127.0.0.1, both with the job's credentials
    (the store's "worker" identity) in their environment; the worker node in its own mount namespace
    where that is possible. Stopped at the end of the module."""
    driver_only = tmp_path_factory.mktemp("driver-only")
    env = {**os.environ, **s3_store.env("worker")}
    procs = []
    port = free_port()
    try:  # both nodes start at once: the worker node waits for the head's GCS
        procs.append(start_node([sys.executable, str(REPO / "tests" / "ray_node.py"), "head", "--port", str(port)], env))
        why_not = isolation_unavailable()
        cmd = [sys.executable, str(REPO / "tests" / "ray_node.py"), "worker", f"127.0.0.1:{port}", "--hidden", str(driver_only)]
        if why_not is None:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SETUP, "sh", *cmd]
        procs.append(start_node(cmd, env))
        info, winfo = node_info(procs[0]), node_info(procs[1])
        isolated = why_not is None and winfo["sees_hidden"] is False and winfo["writes_outside_tmp"] is False
        if why_not is None and not isolated:
            why_not = f"the worker node's namespace is not isolated as intended: {winfo}"
        # Ray resolves 127.0.0.1 in an address to the host's network address unless it runs as if on a
        # single machine: this keeps the driver on 127.0.0.1 like the nodes
        driver_env = {**s3_store.env("worker"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        yield Cluster(info["gcs"], driver_env, isolated, why_not, procs)
    finally:
        for proc in reversed(procs):
            stop_node(proc)


@pytest.fixture
def as_worker(s3_store, monkeypatch):
    """This process reaches the store as the job does (the "worker" identity)."""
    for k, v in s3_store.env("worker").items():
        monkeypatch.setenv(k, v)
    return s3_store


def part_nodes(s3_store, out: str) -> set[str]:
    from ferry.batch.job import SUCCESS_FILE, read_part_footer

    fs, root = s3_store.filesystem(), out.split("://", 1)[1].rstrip("/")
    manifest = json.loads(fs.open_input_stream(f"{root}/{SUCCESS_FILE}").read())
    return {read_part_footer(fs, f"{root}/{f['name']}")[0]["node"] for f in manifest["files"]}


def put(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


# --- a real cluster: no shared disk ----------------------------------------------------------------


@pytest.mark.slow
def test_s3_in_and_out_on_a_cluster_whose_worker_node_shares_no_disk(s3_store, s3_cluster, as_worker, cnn_export, tmp_path):
    """Inputs from a bucket (a list file of keys, relative and absolute), results to a bucket, the
    model shipped to the nodes: every input once, predictions equal to the runtime's on the same
    files, each unreadable input a row with its reason, and both nodes wrote part files."""
    if not s3_cluster.isolated:
        pytest.skip(s3_cluster.why_not)
    imgs = tmp_path / "imgs"
    write_digit_pngs(imgs, 60, seed=11)
    write_bad_images(imgs)
    s3_store.upload(imgs, "ferry-in/twonode/imgs")
    admin = s3_store.filesystem()
    put(admin, "ferry-locked/closed/secret.png", (imgs / "digit_0000.png").read_bytes())
    listing = [f"imgs/{p.name}" for p in sorted(imgs.iterdir())] + ["s3://ferry-locked/closed/secret.png", "imgs/missing.png"]
    put(admin, "ferry-in/twonode/inputs.txt", ("# inputs\n" + "\n".join(listing) + "\n").encode())
    out = "s3://ferry-out/twonode/results"

    # one actor a node (1 CPU each); Ray Data hands out work only once both are up, so that the worker
    # node, which cannot see the driver's disk, surely gets parts to write
    both = {**s3_cluster.driver_env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}
    proc = run_ferry("batch", str(cnn_export[0]), "s3://ferry-in/twonode/inputs.txt", "--out", out, "--address",
                     s3_cluster.address, "--workers", "2", "--cpus-per-worker", "0.6", "--batch-size", "8", "--top-k", "3",
                     env=both)
    assert proc.returncode == 1, proc.stderr[-3000:]  # some inputs are bad: exit 1, like ferry predict
    n = len(listing)
    assert f"{n} images, {len(BAD_IMAGES) + 2} failed" in proc.stdout, proc.stdout
    assert not (REPO / "s3:").exists()  # no local folder named after the URI
    from ferry.batch.job import read_results
    from ferry.runtime import Classifier

    rows = {r["path"]: r for r in read_results(out).to_pylist()}
    expected = [f"s3://ferry-in/twonode/{e}" if "://" not in e else e for e in listing]
    assert sorted(rows) == sorted(expected) and len(read_results(out)) == n  # every input exactly once
    assert rows["s3://ferry-locked/closed/secret.png"]["error"].endswith(": permission denied")
    assert rows["s3://ferry-in/twonode/imgs/missing.png"]["error"].endswith(": no such file")
    want = {Path(o.source).name: o for o in Classifier.from_onnx(cnn_export[0], provider="cpu").predict_many(
        sorted(str(p) for p in imgs.iterdir()), top_k=3)}
    for name, o in want.items():
        row = rows[f"s3://ferry-in/twonode/imgs/{name}"]
        if o.ok:
            assert row["error"] is None and row["index"] == o.prediction.index
            assert abs(row["probability"] - o.prediction.probability) <= 1e-6
        else:
            assert row["index"] is None and BAD_IMAGES[name] in row["error"]
    assert len(part_nodes(s3_store, out)) == 2  # the worker node, which cannot see the driver's disk, wrote parts too

    # a part file lost from the store: --resume withdraws the commit, redoes that part alone and commits again
    admin.delete_file("ferry-out/twonode/results/part-000003.parquet")
    resumed = run_ferry("batch", str(cnn_export[0]), "s3://ferry-in/twonode/inputs.txt", "--out", out, "--address",
                        s3_cluster.address, "--top-k", "3", "--resume", env=s3_cluster.driver_env)
    assert resumed.returncode == 1 and f"{n} images, {len(BAD_IMAGES) + 2} failed" in resumed.stdout, resumed.stderr[-2000:]
    parts = json.loads(admin.open_input_stream("ferry-out/twonode/results/_ferry_job.json").read())["parts"]
    assert f"{parts - 1} of {parts} parts kept from an earlier run" in resumed.stdout
    assert {r["path"]: r["index"] for r in read_results(out).to_pylist()} == {p: r["index"] for p, r in rows.items()}

    # a local --out on this cluster would scatter the parts over the nodes' own disks: refused, naming why
    local = run_ferry("batch", str(cnn_export[0]), "s3://ferry-in/twonode/inputs.txt", "--out", str(tmp_path / "local"),
                      "--address", s3_cluster.address, env=s3_cluster.driver_env)
    assert_clean_error(local, "cannot be read from 1 of 2 nodes", "shared by every node")
    # local inputs the worker node cannot see would be rows of "no such file": refused, naming why
    local_in = run_ferry("batch", str(cnn_export[0]), str(imgs), "--out", "s3://ferry-out/twonode/local-inputs",
                         "--address", s3_cluster.address, env=s3_cluster.driver_env)
    assert_clean_error(local_in, "the inputs are not on 1 of 2 nodes", f"has no {imgs}", "shared by every node")


# --- a driver killed mid-job, then --resume -------------------------------------------------------------


DRIVER = """
import sys
from ferry.batch.job import BatchOptions, run_batch
run_batch(BatchOptions(model=sys.argv[1], input=sys.argv[2], out=sys.argv[3], address=sys.argv[4],
                       throttle_ms=int(sys.argv[5])), log=lambda _m: None)
"""


@pytest.mark.slow
def test_a_driver_killed_mid_job_then_resume_gives_every_input_once(ray_local, cnn_export, tmp_path, monkeypatch):
    """5,000 images to a local --out whose parent folders do not exist yet: SIGKILL the driver (a
    process of its own, joined to the session's Ray) once some part files are written. Nothing is
    committed; a plain re-run is refused; `--resume` keeps the complete parts untouched, redoes a part
    cut short and the rest, drops a killed writer's temporary file, and commits: 5,000 rows, each
    input once, none with an error. Then the job is done: --resume has nothing to do, without Ray."""
    from ferry.batch.job import JOB_FILE, SUCCESS_FILE, BatchOptions, read_results, run_batch
    from ferry.core.errors import FerryError

    n = 5000
    files = write_digit_pngs(tmp_path / "in", n, seed=12)
    out = tmp_path / "not" / "yet" / "out"
    address = ray_local.get_runtime_context().gcs_address

    def parts_written() -> int:
        return len(list(out.glob("part-*.parquet")))

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(cnn_export[0]), str(tmp_path / "in"), str(out), address, "60"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while parts_written() < 6 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"the driver ended before it could be killed: {driver.stderr.read()[-2000:]}"
        assert parts_written() >= 6, "no part files within the deadline"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(2)  # the killed driver's actors are ended by Ray; a part file they were writing may still land
    done = sorted(out.glob("part-*.parquet"))
    assert not (out / SUCCESS_FILE).exists()  # nothing committed
    with pytest.raises(FerryError, match="no committed results"):
        read_results(str(out))
    job = json.loads((out / JOB_FILE).read_text())
    assert 6 <= len(done) < job["parts"], "the job finished before the driver was killed"
    cut, kept = done[-1], done[:-1]  # one complete part cut short (a damaged file), the others must stay as they are
    cut.write_bytes(cut.read_bytes()[:100])
    (out / f".{cut.name}.0123456789ab.tmp").write_bytes(b"half")  # a killed writer's temporary file
    mtimes = {p.name: p.stat().st_mtime_ns for p in kept}

    args = ["batch", str(cnn_export[0]), str(tmp_path / "in"), "--out", str(out), "--address", address]
    assert_clean_error(run_ferry(*args), "unfinished run of this job", "--resume")
    proc = run_ferry(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"(\d+) of (\d+) parts kept from an earlier run", proc.stdout)  # a straggler's part may count too
    assert found and len(kept) <= int(found[1]) < job["parts"] == int(found[2]), proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in kept} == mtimes  # complete parts were not redone

    table = read_results(str(out))
    paths = table.column("path").to_pylist()
    assert len(paths) == n and len(set(paths)) == n  # each input exactly once
    assert set(paths) == {str(p.resolve()) for p in files}
    assert table.column("error").null_count == n and table.column("index").null_count == 0  # none with an error
    manifest = json.loads((out / SUCCESS_FILE).read_text())
    assert manifest["rows"] == n and manifest["inputs"]["count"] == n and manifest["job"] == job["job"]
    assert [f["name"] for f in manifest["files"]] == [f"part-{i:06d}.parquet" for i in range(job["parts"])]
    assert sorted(p.name for p in out.iterdir()) == sorted([JOB_FILE, SUCCESS_FILE] + [f["name"] for f in manifest["files"]])

    import ferry.cluster

    monkeypatch.setattr(ferry.cluster, "start_ray", lambda *_a, **_k: pytest.fail("Ray was started"))
    opts = BatchOptions(model=str(cnn_export[0]), input=str(tmp_path / "in"), out=str(out))
    assert run_batch(BatchOptions(**{**opts.__dict__, "resume": True}), log=lambda _m: None).resumed_parts == job["parts"]
    with pytest.raises(FerryError, match="already holds this job's committed results"):
        run_batch(opts, log=lambda _m: None)


# --- errors before Ray starts ------------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of Ray fails the test: the errors below must come before it."""
    import ferry.cluster

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ferry.cluster, "start_ray", refuse)


def test_store_and_out_errors_come_before_ray(s3_store, as_worker, no_ray, cnn_export, tmp_path, monkeypatch):
    from ferry.batch.job import JOB_FILE, BatchOptions, _job_record, resolve_inputs, run_batch
    from ferry.core.errors import FerryError

    folder = tmp_path / "in"
    paths = write_digit_pngs(folder, 4)
    model = str(cnn_export[0])

    def fails(needle: str, **kw):
        opts = BatchOptions(**{"model": model, "input": str(folder), "out": "s3://ferry-out/errors/a", **kw})
        with pytest.raises(FerryError) as err:
            run_batch(opts, log=lambda _m: None)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)

    fails("bucket 'no-such-bucket' does not exist at http://127.0.0.1:", out="s3://no-such-bucket/out")
    fails("does not exist", input="s3://no-such-bucket/photos/")
    fails("does not exist", input="s3://ferry-in/errors/nothing-here/")

    # --out holds another job's output: another model, other inputs; an unfinished run; foreign files; a file
    fs = s3_store.filesystem()
    items = [str(p) for p in paths]
    other_model = _job_record(BatchOptions(model=model, input=str(folder), out=""), "0" * 64, "x", items, 2)
    put(fs, f"ferry-out/errors/other-model/{JOB_FILE}", json.dumps(other_model).encode())
    fails("holds another job's output (another model", out="s3://ferry-out/errors/other-model", resume=True)
    from ferry.core.fileio import sha256_file

    other_inputs = _job_record(BatchOptions(model=model, input="", out=""), sha256_file(model), "x", items[:3], 2)
    put(fs, f"ferry-out/errors/other-inputs/{JOB_FILE}", json.dumps(other_inputs).encode())
    fails("holds another job's output (other inputs (3 listed then, 4 now))", out="s3://ferry-out/errors/other-inputs")
    same = _job_record(BatchOptions(model=model, input="", out="", top_k=5), sha256_file(model), "x", items, 2)
    put(fs, f"ferry-out/errors/unfinished/{JOB_FILE}", json.dumps(same).encode())
    put(fs, "ferry-out/errors/unfinished/part-000000.parquet", b"cut short")
    fails("holds an unfinished run of this job (1 of 2 part files); add --resume", out="s3://ferry-out/errors/unfinished")
    put(fs, "ferry-out/errors/foreign/notes.txt", b"mine")
    fails("holds files that are not this job's (e.g. notes.txt)", out="s3://ferry-out/errors/foreign")
    (tmp_path / "afile").write_text("x")
    fails("is a file", out=str(tmp_path / "afile"))

    # credentials: read-only, wrong, none
    for k, v in s3_store.env("readonly").items():
        monkeypatch.setenv(k, v)
    fails("cannot write to --out s3://ferry-out/errors/a: permission denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    fails("the store refused bucket 'ferry-out'")
    fails("the store refused bucket 'ferry-in'", input="s3://ferry-in/errors/")
    # the endpoint comes from --storage-endpoint when given: an unreachable one fails, with the reason
    for k, v in s3_store.env("worker").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    fails("cannot reach the store at http://127.0.0.1:1", storage_endpoint="http://127.0.0.1:1")
    put(fs, "ferry-in/errors/list/a.png", b"x")
    assert resolve_inputs("s3://ferry-in/errors/list/", s3_store.endpoint) == ["s3://ferry-in/errors/list/a.png"]


def test_cli_store_errors_are_one_line(s3_store, cnn_export, tmp_path):
    """As a user sees them: exit code 2, one line, no traceback."""
    folder = tmp_path / "in"
    write_digit_pngs(folder, 2)
    env = {**s3_store.env("worker"), "AWS_SECRET_ACCESS_KEY": "wrong"}
    assert_clean_error(run_ferry("batch", str(cnn_export[0]), str(folder), "--out", "s3://ferry-out/cli/a", env=env),
                       "the store refused bucket 'ferry-out'", "credentials")
    assert_clean_error(run_ferry("batch", str(cnn_export[0]), str(folder), "--out", "s3://nobucket-here/a",
                                 env=s3_store.env("worker")), "bucket 'nobucket-here' does not exist")


def test_read_files_from_a_store_names_what_it_cannot_read(s3_store, as_worker):
    """Reading objects: bytes, or the reason in a few words (permission denied, no such file)."""
    from ferry.batch.job import read_files

    fs = s3_store.filesystem()
    put(fs, "ferry-locked/open/a.bin", b"aaa")
    put(fs, "ferry-locked/closed/b.bin", b"bbb")
    uris = ["s3://ferry-locked/open/a.bin", "s3://ferry-locked/closed/b.bin", "s3://ferry-locked/open/gone.bin"]
    got = read_files({"path": uris})
    assert got["bytes"] == [b"aaa", b"", b""]
    assert got["read_error"] == ["", f"{uris[1]}: permission denied", f"{uris[2]}: no such file"]


def test_objects_are_read_with_one_get_where_obstore_can(s3_store, as_worker, monkeypatch):
    """With obstore installed and the credentials in the environment, an s3:// object is read by one
    GET (obstore), not pyarrow's HEAD + GET: the pyarrow path is not taken, and the bytes and the
    reasons are the same."""
    pytest.importorskip("obstore")
    from ferry.batch import storage
    from ferry.batch.job import read_files

    fs = s3_store.filesystem()
    put(fs, "ferry-locked/open/one.bin", b"one")

    def pyarrow_path(*_a, **_k):
        raise AssertionError("read through pyarrow's HEAD + GET")

    monkeypatch.setattr(storage, "read_bytes", pyarrow_path)
    uris = ["s3://ferry-locked/open/one.bin", "s3://ferry-locked/open/none.bin"]
    got = read_files({"path": uris})
    assert got["bytes"] == [b"one", b""] and got["read_error"] == ["", f"{uris[1]}: no such file"]
