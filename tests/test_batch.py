"""`ferry batch` on Ray Data: one row per input, each path once (also when an actor is killed, and on
a simulated two-node cluster), hostile inputs as rows with errors, results equal to `ferry predict`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ferry.core.errors import FerryError
from tests.conftest import BAD_IMAGES, REPO, assert_clean_error, run_ferry, write_bad_images, write_digit_pngs

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")


def read_rows(out: Path) -> list[dict]:
    """The committed rows of a job (only the files its _SUCCESS.json lists)."""
    from ferry.batch.job import read_results

    return read_results(str(out)).to_pylist()


def live_predict_actors() -> list[dict]:
    """Alive PredictPart actors with their Pid and node, from the GCS (no dashboard needed)."""
    from ray._private import state

    return [{"pid": a["Pid"], "node": a["Address"]["NodeID"]} for a in state.actors().values()
            if a["State"] == "ALIVE" and "PredictPart" in a["ActorClassName"]]


def test_batch_equals_predict_and_turns_hostile_inputs_into_rows(ray_local, cnn_export, tmp_path):
    from ferry.batch.job import BatchOptions, run_batch
    from ferry.runtime import Classifier

    folder = tmp_path / "in"
    write_digit_pngs(folder, 40, seed=4)
    write_bad_images(folder)
    files = sorted(str(p.resolve()) for p in folder.iterdir())
    summary = run_batch(BatchOptions(model=str(cnn_export[0]), input=str(folder), out=str(tmp_path / "out"),
                                     batch_size=7, top_k=3), log=lambda _m: None)
    rows = read_rows(tmp_path / "out")
    assert sorted(r["path"] for r in rows) == files  # every input exactly once
    assert summary.images == len(files) == 48 and summary.failures == len(BAD_IMAGES)
    assert summary.providers == ["CPUExecutionProvider"] and summary.threads_per_worker >= 1

    expected = {o.source: o for o in Classifier.from_onnx(cnn_export[0], provider="cpu").predict_many(files, top_k=3)}
    for row in rows:
        want = expected[row["path"]]
        if want.ok:
            assert row["error"] is None and row["index"] == want.prediction.index
            assert row["label"] == want.prediction.label
            assert abs(row["probability"] - want.prediction.probability) <= 1e-6
            assert [c["index"] for c in row["top_k"]] == [c.index for c in want.prediction.top_k]
        else:
            name = Path(row["path"]).name
            assert row["index"] is None and BAD_IMAGES[name] in row["error"] and name in row["error"]

    # the decode stage of GPU jobs (decoding in CPU tasks ahead of the actors), here on the CPU: the same rows
    run_batch(BatchOptions(model=str(cnn_export[0]), input=str(folder), out=str(tmp_path / "decoded"), batch_size=7,
                           top_k=3, decode_stage=True, decode_cpus=0.25), log=lambda _m: None)
    decoded = {r["path"]: r for r in read_rows(tmp_path / "decoded")}
    assert sorted(decoded) == files
    for row in rows:
        other = decoded[row["path"]]
        assert (other["index"], other["label"], other["error"]) == (row["index"], row["label"], row["error"])
        assert other["probability"] == row["probability"] or abs(other["probability"] - row["probability"]) <= 1e-6

    # a committed part written over by another job's (two jobs on one --out): the reader refuses the results
    part = tmp_path / "out" / "part-000000.parquet"
    table = pq.read_table(part)
    meta = json.loads(table.schema.metadata[b"ferry.batch"])
    pq.write_table(table.replace_schema_metadata({b"ferry.batch": json.dumps({**meta, "job": "0123456789abcdef"}).encode()}),
                   part)
    with pytest.raises(FerryError, match="part-000000.parquet is not the part _SUCCESS.json committed"):
        read_rows(tmp_path / "out")


def test_a_list_file_with_a_missing_path_and_a_glob(ray_local, cnn_export, tmp_path):
    from ferry.batch.job import BatchOptions, run_batch

    paths = write_digit_pngs(tmp_path / "in", 6)
    # relative entries are relative to the list file's folder
    (tmp_path / "in" / "paths.txt").write_text("# inputs\n" + "\n".join(p.name for p in paths[:4]) + "\n\nmissing.png\n")
    summary = run_batch(BatchOptions(model=str(cnn_export[0]), input=str(tmp_path / "in" / "paths.txt"),
                                     out=str(tmp_path / "out")), log=lambda _m: None)
    rows = {Path(r["path"]).name: r for r in read_rows(tmp_path / "out")}
    assert sorted(rows) == sorted([p.name for p in paths[:4]] + ["missing.png"])
    assert "no such file" in rows["missing.png"]["error"] and summary.failures == 1
    run_batch(BatchOptions(model=str(cnn_export[0]), input=str(tmp_path / "in" / "digit_000[0-2].png"),
                           out=str(tmp_path / "out2")), log=lambda _m: None)
    assert len(read_rows(tmp_path / "out2")) == 3
    # a folder given as a URI is listed and read through pyarrow's filesystem for its scheme
    summary = run_batch(BatchOptions(model=str(cnn_export[0]), input=(tmp_path / "in").as_uri(), out=str(tmp_path / "out3")),
                        log=lambda _m: None)
    rows = {r["path"]: r for r in read_rows(tmp_path / "out3")}
    assert sorted(rows) == sorted(p.as_uri() for p in (tmp_path / "in").iterdir())
    assert summary.failures == 1 and rows[(tmp_path / "in" / "paths.txt").as_uri()]["error"]  # the list is no image
    assert all(r["error"] is None and r["index"] is not None for u, r in rows.items() if u.endswith(".png"))


def test_the_inputs_digest_tells_a_newline_in_a_name_from_two_names():
    """The job's and each part's digest of their inputs: a list without a newline in any name keeps
    the digest jobs written before recorded (their --resume still matches); ["a\\nb"] and ["a", "b"]
    hashed alike before (each name ended by a newline), so a part's footer could vouch for other inputs."""
    import hashlib

    from ferry.batch.job import _digest

    assert _digest(["/d/a.png", "/d/b.png"]) == hashlib.sha256(b"/d/a.png\n/d/b.png\n").hexdigest()
    assert _digest(["/d/a\n/d/b.png"]) != _digest(["/d/a", "/d/b.png"])
    assert _digest(["/d/a\n", "b"]) != _digest(["/d/a", "\nb"])


def test_read_files_reads_paths_and_uris_and_names_what_it_cannot_read(tmp_path):
    from ferry.batch.job import read_files

    a, b = tmp_path / "a.bin", tmp_path / "sub" / "b.bin"
    b.parent.mkdir()
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbbb")
    batch = read_files({"path": [str(a), b.as_uri(), a.as_uri(), str(tmp_path / "gone.png")]})
    assert batch["bytes"][:3] == [b"aaa", b"bbbb", b"aaa"] and batch["read_error"][:3] == [""] * 3
    assert batch["bytes"][3] == b"" and batch["read_error"][3] == f"{tmp_path / 'gone.png'}: no such file"


def test_a_file_too_large_for_an_image_is_a_row_unread(tmp_path, monkeypatch):
    """A file larger than any image the runtime decodes (a stray video, an archive) is a row with its
    error, its bytes not read: a worker that read it whole could run out of memory on every retry."""
    import ferry.batch.job as job
    from ferry.runtime.images import max_pixels

    assert job.max_input_bytes() > 4 * max_pixels()  # an uncompressed RGBA image at Pillow's limit still fits
    monkeypatch.setattr(job, "max_input_bytes", lambda: 3)
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    small.write_bytes(b"abc")
    large.write_bytes(b"abcd")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opened to read, it would wait for a writer for ever
    assert job.read_files({"path": [str(fifo)]})["read_error"] == [f"{fifo}: not a regular file (a FIFO, a device or a socket)"]
    batch = job.read_files({"path": [str(small), str(large), small.as_uri(), large.as_uri()]})
    assert batch["bytes"] == [b"abc", b"", b"abc", b""]
    assert batch["read_error"][0] == batch["read_error"][2] == ""
    for i, where in ((1, str(large)), (3, large.as_uri())):
        assert batch["read_error"][i] == f"{where}: too large for an image (0 MiB; at most 0 MiB)"


def test_obstore_signs_for_the_buckets_own_region(monkeypatch):
    """On Amazon S3 without $AWS_REGION, obstore's reads are signed for the bucket's own region (asked
    of S3, as pyarrow does), not us-east-1, which S3 answers with a redirect for a bucket elsewhere;
    when S3 cannot say, pyarrow reads; an S3-compatible store (an endpoint) or a region set is used as is."""
    pytest.importorskip("obstore")
    import pyarrow.fs as pafs

    from ferry.batch.storage import FileSystems

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    asked = []
    monkeypatch.setattr(pafs, "resolve_s3_region", lambda bucket: asked.append(bucket) or "eu-west-1")
    assert FileSystems()._object_store("photos").config["region"] == "eu-west-1" and asked == ["photos"]

    def offline(bucket):
        raise OSError("cannot resolve")

    monkeypatch.setattr(pafs, "resolve_s3_region", offline)
    assert FileSystems()._object_store("photos") is None
    assert FileSystems("http://127.0.0.1:1")._object_store("photos").config["region"] == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert FileSystems()._object_store("photos").config["region"] == "ap-south-1"


def test_a_killed_actor_loses_and_doubles_nothing(ray_local, cnn_export, tmp_path):
    """SIGKILL one actor process in the middle of a job: Ray restarts it and retries its work; the
    output still has every path exactly once."""
    from ferry.batch.job import BatchOptions, run_batch

    files = write_digit_pngs(tmp_path / "in", 240, seed=7)
    opts = BatchOptions(model=str(cnn_export[0]), input=str(tmp_path / "in"), out=str(tmp_path / "out"), batch_size=8,
                        throttle_ms=150)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_batch(opts, log=lambda _m: None)))
    job.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and job.is_alive():
        actors = live_predict_actors()
        if len(actors) >= 2:
            time.sleep(1.0)  # both busy with batches by now
            os.kill(actors[0]["pid"], signal.SIGKILL)
            killed = actors[0]["pid"]
        time.sleep(0.1)
    assert killed is not None and job.is_alive(), "the job ended before an actor could be killed"
    job.join(timeout=300)
    assert not job.is_alive()
    rows = read_rows(tmp_path / "out")
    assert sorted(r["path"] for r in rows) == sorted(str(p.resolve()) for p in files)
    assert result["summary"].failures == 0


# Put on PYTHONPATH, this kills a Ray worker process whenever it decodes an input named *crash*, as a
# decoder's segfault would (the driver and every other process are untouched).
CRASHING_DECODER = """
import os
import sys

if sys.argv[:1] and sys.argv[0].endswith("default_worker.py"):
    import signal

    import ferry.runtime.images as images

    _decode = images.decode_image

    def decode_image(data, name="image"):
        if "crash" in os.path.basename(str(name)):
            os.kill(os.getpid(), signal.SIGKILL)
        return _decode(data, name)

    images.decode_image = decode_image
"""


@pytest.mark.slow
def test_an_input_that_crashes_its_worker_every_time_fails_the_job_naming_its_part(cnn_export, tmp_path):
    """Ray Data restarts actors and retries tasks without end by default: an input that killed its
    worker process every time it was decoded had `ferry batch` loop forever. The retries are bounded
    now: the job fails with a line naming the part and its inputs, the other parts are written, and
    --resume (here with the crash gone) finishes the rest. A job of its own Ray (a subprocess), whose
    workers inherit the crashing decoder."""
    import shutil

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_DECODER)
    folder = tmp_path / "in"
    files = write_digit_pngs(folder, 40, seed=3)
    shutil.copy(files[5], folder / "digit_0005_crash.png")  # the 7th input, in the first part of 8
    out = tmp_path / "out"
    args = ("batch", str(cnn_export[0]), str(folder), "--out", str(out), "--batch-size", "8", "--workers", "2")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    proc = run_ferry(*args, env={"PYTHONPATH": path}, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ferry batch: error: part-000000.parquet (inputs 1-8 of 41: {folder / 'digit_0000.png'} to "
                           f"{folder / 'digit_0006.png'}) failed on each of its "), line
    assert "attempts: the worker process predicting it died every time" in line and "\n" not in line
    assert line.endswith("the parts written so far are kept: run again with --resume to finish the rest"), line
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:06d}.parquet" for i in range(1, 6)]
    assert not (out / "_SUCCESS.json").exists()
    proc = run_ferry(*args, "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "41 images, 0 failed" in proc.stdout and "5 of 6 parts kept from an earlier run" in proc.stdout, proc.stdout
    assert sorted(Path(r["path"]).name for r in read_rows(out)) == sorted(p.name for p in folder.iterdir())


def test_two_node_cluster_on_one_machine(cnn_export, tmp_path):
    """ray.cluster_utils.Cluster with two nodes (its own Ray, in a subprocess): actors on both nodes,
    every row once."""
    write_digit_pngs(tmp_path / "in", 60, seed=8)
    code = f"""
import json, ray
from ray.cluster_utils import Cluster
from ferry.batch.job import BatchOptions, run_batch
from tests.test_batch import live_predict_actors
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False}})
cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
nodes = set()
def spy(msg):
    pass
opts = BatchOptions(model={str(cnn_export[0])!r}, input={str(tmp_path / "in")!r}, out={str(tmp_path / "out")!r},
                    workers=2, cpus_per_worker=0.6, batch_size=4, throttle_ms=50)
import threading
done = {{}}
t = threading.Thread(target=lambda: done.update(s=run_batch(opts, log=spy)))
t.start()
while t.is_alive():
    nodes |= {{a["node"] for a in live_predict_actors()}}
    t.join(0.2)
print(json.dumps({{"images": done["s"].images, "nodes": len(nodes), "cluster_nodes": len(ray.nodes())}}))
ray.shutdown()
cluster.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"images": 60, "nodes": 2, "cluster_nodes": 2}
    assert len(read_rows(tmp_path / "out")) == 60 and len({r["path"] for r in read_rows(tmp_path / "out")}) == 60


def test_an_out_inside_the_inputs_folder_and_a_failed_commit(ray_local, cnn_export, tmp_path, monkeypatch):
    """--out inside the folder of inputs: its own files (the job's record, part files, manifest) are
    never inputs, so a re-run lists the same inputs and finds the job. A commit that cannot be
    written is one line that says the parts are kept, and --resume then commits them."""
    import dataclasses

    import ferry.batch.job as job
    from ferry.batch.job import BatchOptions, run_batch

    folder = tmp_path / "in"
    write_digit_pngs(folder, 6)
    opts = BatchOptions(model=str(cnn_export[0]), input=str(folder), out=str(folder / "results"))
    write = job.write_bytes

    def refused(fs, path, data, **kw):
        if path.endswith(job.SUCCESS_FILE):
            raise PermissionError("read-only")
        return write(fs, path, data, **kw)

    monkeypatch.setattr(job, "write_bytes", refused)  # the driver's writes (the actors write their parts)
    with pytest.raises(FerryError, match="cannot commit .*permission denied; every part file is written: run again "
                                         "with --resume"):
        run_batch(opts, log=lambda _m: None)
    monkeypatch.setattr(job, "write_bytes", write)
    said = []
    summary = run_batch(dataclasses.replace(opts, resume=True), log=said.append)
    assert "2 file(s) inside --out" in said[0]  # the job's record and its one part file
    assert summary.images == 6 and summary.failures == 0 and summary.resumed_parts == 1
    assert sorted(Path(r["path"]).name for r in read_rows(folder / "results")) == sorted(p.name for p in folder.glob("*.png"))
    said.clear()
    run_batch(dataclasses.replace(opts, resume=True), log=said.append)
    assert "nothing to do" in said[-1]


def test_cli_run_on_the_session_ray_and_bad_arguments(ray_local, cnn_export, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    folder = write_bad_images(tmp_path / "in")
    proc = run_ferry("batch", str(cnn_export[0]), str(folder), "--out", str(tmp_path / "out"), "--address", address)
    assert proc.returncode == 1, proc.stderr  # some inputs failed: exit 1, like ferry predict
    assert f"{len(BAD_IMAGES) + 2} images, {len(BAD_IMAGES)} failed" in proc.stdout and "Traceback" not in proc.stderr
    model = str(cnn_export[0])
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "none.onnx"), str(folder)], "model not found"),
        ([model, str(tmp_path / "empty")], "no input files"),
        ([model, str(tmp_path / "nowhere")], "does not exist"),
        ([model, str(folder), "--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
        ([model, str(folder), "--address", "127.0.0.1:99999"], "a port of 1 to 65535"),
        ([model, str(folder), "--batch-size", "0"], "--batch-size must be >= 1"),
        ([model, str(folder), "--object-store-mb", "0"], "--object-store-mb must be >= 80"),
        ([model, str(folder), "--object-store-mb", "100000000"], "cannot start a local Ray"),
        ([model, str(folder), "--cpus-per-worker", "nan"], "--cpus-per-worker must be a number >= 0 (got nan)"),
        ([model, str(folder), "--provider", "tensorrt"], "tensorrt"),
        ([model, str(folder), "--workers", "4", "--cpus-per-worker", "1", "--address", address], "starve"),
    ]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.png\n".encode("latin-1"))
    cases.append(([model, str(tmp_path / "latin1.txt")], "is not UTF-8 text (byte 3)"))
    # a file whose name is not UTF-8 (an old Latin-1 archive): it was a traceback (UnicodeEncodeError)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "ok.png").write_bytes((folder / "a_good.png").read_bytes())
    with open(os.path.join(os.fsencode(odd), b"caf\xe9.png"), "wb") as f:
        f.write((folder / "a_good.png").read_bytes())
    cases.append(([model, str(odd)], "1 input name(s) are not valid UTF-8 (e.g. " + str(odd) + "/caf\\xe9.png)"))
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert_clean_error(run_ferry("batch", *args, "--out", str(out)), needle)
        # refused before --out is claimed (a record there would refuse the corrected run as "another job's");
        # too many workers is known only once Ray tells the cluster's CPUs, a store too large once Ray starts
        assert not out.exists() or needle in ("starve", "cannot start a local Ray"), args
    assert_clean_error(run_ferry("batch", model, str(folder), "--out", str(tmp_path / "out")), "already holds this job's")
