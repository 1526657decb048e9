"""One Ray node for the cluster tests, on 127.0.0.1, until SIGTERM:

  python tests/ray_node.py head [--port GCS_PORT]
  python tests/ray_node.py worker GCS_ADDRESS [--hidden PATH]   (it waits for the head's GCS)

Prints one JSON line when the node is up: its GCS address, whether PATH (a folder of the driver's) is
visible from here, and whether this process can write outside /tmp and /dev/shm (the tests run a
worker node in its own mount namespace, with a private /tmp and a read-only root, to stand for a
machine that shares no disk with the driver)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading


def can_write_outside_tmp() -> bool:
    for folder in (os.path.expanduser("~"), os.path.dirname(os.path.abspath(__file__)), "/var/tmp"):
        try:
            with tempfile.NamedTemporaryFile(dir=folder):
                return True
        except OSError:
            continue
    return False


def main(argv: list[str]) -> int:
    import ray._private.node
    import ray._private.parameter

    role = argv[0]
    hidden = argv[argv.index("--hidden") + 1] if "--hidden" in argv else None
    params = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * 2**20, "min_worker_port": 0,
              "max_worker_port": 0}
    if role == "head":
        params.update(include_dashboard=False, gcs_server_port=int(argv[argv.index("--port") + 1]) if "--port" in argv else 0)
    else:
        params.update(gcs_address=argv[1], include_log_monitor=False, node_manager_port=0)
    node = ray._private.node.Node(ray._private.parameter.RayParams(**params), head=role == "head", shutdown_at_exit=True,
                                  spawn_reaper=True)
    print(json.dumps({"gcs": node.gcs_address, "sees_hidden": os.path.exists(hidden) if hidden else None,
                      "writes_outside_tmp": can_write_outside_tmp()}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
