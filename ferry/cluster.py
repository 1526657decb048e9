"""Joining a Ray cluster, or starting a bounded local Ray: shared by `ferry batch` and `ferry serve
--address`. Ray is imported inside the functions (`pip install 'ferry[scale]'`)."""

from __future__ import annotations

import logging
import socket
import time

from ferry.core.errors import FerryError


def check_address(address: str, *, local: bool = False) -> None:
    """A FerryError naming every accepted form unless `address` is one of them: auto, HOST:PORT or
    ray://HOST:PORT, and also `local` where the command takes it (`local=True`: ferry serve)."""
    if address == "auto" or (local and address == "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        forms = ("auto, HOST:PORT (a port of 1 to 65535), ray://HOST:PORT, or local (start a local Ray for this server)"
                 if local else "auto, HOST:PORT (a port of 1 to 65535) or ray://HOST:PORT (without --address: a local Ray)")
        raise FerryError(f"--address {address!r}: expected {forms}")


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A HOST:PORT or ray://HOST:PORT address that nothing answers is an error now, not a long retry;
    a malformed one is refused with the accepted forms (`check_address`)."""
    check_address(address)
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise FerryError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from exc


def quiet_ray_data() -> None:
    """Ray Data's and Serve's progress chatter (and its notice that progress bars are off) stay quiet."""
    for name in ("ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(address: str | None, *, object_store_mb: int = 256, num_cpus: float | None = None) -> tuple[bool, float]:
    """Join `address` ("auto", "HOST:PORT", "ray://HOST:PORT"), or start a local Ray with a bounded
    object store, no dashboard and quiet logs. Returns (whether this call started or joined it, so
    the caller shuts it down; seconds taken). An already initialised Ray is used as it is."""
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return False, 0.0
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FerryError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0][:200]}") from exc
    else:
        if object_store_mb < 80:
            raise FerryError(f"--object-store-mb must be >= 80 (Ray's minimum is 75 MiB; got {object_store_mb})")
        from ferry.core.machine import usable_cpus

        try:
            ray.init(num_cpus=num_cpus or usable_cpus(), object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        except ValueError as exc:  # an object store this machine's memory cannot hold, ...
            raise FerryError(f"cannot start a local Ray: {str(exc).splitlines()[0][:300]}") from exc
    quiet_ray_data()
    return True, time.perf_counter() - t0
