"""What a private task network costs (agents/netns.py), as root on a node with pasta:

- setup: making a task's namespace with pasta attached, and removing it (per task start/end);
- throughput: one TCP stream of BYTES from a task's namespace through pasta to an "outside"
  namespace behind a veth pair, against the same stream from the node's own namespace.

    sudo .venv/bin/python -m agents.netbench [--tasks 10] [--mib 512]

Prints one JSON line. Cleans up what it made (namespaces, veth, pasta) whatever happens.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from agents.netns import run_in_netns
from agents.netopen import open_namespaces

OUTSIDE, HOST_SIDE = "198.51.100.2", "198.51.100.1"
CHUNK = 256 * 1024


def _sink(ns: str, port: int) -> subprocess.Popen[bytes]:
    code = (
        "import socket,sys\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{port}));s.listen();print('ok',flush=True)\n"
        "while True:\n"
        " c,_=s.accept()\n"
        " while c.recv(1<<20): pass\n"
        " c.sendall(b'done');c.close()\n"
    )
    sink = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-c", code], stdout=subprocess.PIPE
    )
    assert sink.stdout is not None
    sink.stdout.readline()
    return sink


def _send(total: int, port: int) -> float:
    """Seconds to send `total` bytes to the outside and hear that it has them all."""
    data = b"\0" * CHUNK
    started = time.perf_counter()
    with socket.create_connection((OUTSIDE, port), timeout=30) as conn:
        sent = 0
        while sent < total:
            conn.sendall(data)
            sent += CHUNK
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(16) == b"done"
    return time.perf_counter() - started


def run(tasks: int, mib: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as state:
        namespaces, why = open_namespaces(Path(state))
        if namespaces is None:
            raise SystemExit(f"this host cannot build network namespaces: {why}")
        setup, teardown = [], []
        for task_id in range(1, tasks + 1):
            t0 = time.perf_counter()
            namespaces.create(task_id)
            t1 = time.perf_counter()
            namespaces.remove(task_id)
            setup.append((t1 - t0) * 1000)
            teardown.append((time.perf_counter() - t1) * 1000)
        tag = uuid.uuid4().hex[:6]
        ns, near, far = f"fgbench-{tag}", f"fgbo{tag}", f"fgbi{tag}"
        script = (
            f"ip netns add {ns} && ip link add {near} type veth peer name {far} && "
            f"ip link set {far} netns {ns} && ip addr add {HOST_SIDE}/30 dev {near} && "
            f"ip link set {near} up && ip netns exec {ns} ip addr add {OUTSIDE}/30 dev {far} && "
            f"ip netns exec {ns} ip link set {far} up"
        )
        subprocess.run(["sh", "-c", script], check=True)
        port, total = 47201, mib * 2**20
        sink = _sink(ns, port)
        try:
            namespaces.create(999)
            through_pasta = run_in_netns(namespaces.path(999), lambda: _send(total, port))
            direct = _send(total, port)
        finally:
            namespaces.close()
            sink.kill()
            sink.wait()
            subprocess.run(["ip", "link", "delete", near], check=False)
            subprocess.run(["ip", "netns", "delete", ns], check=False)
    return {
        "tasks": tasks,
        "setup_ms_median": round(statistics.median(setup), 1),
        "setup_ms_max": round(max(setup), 1),
        "teardown_ms_median": round(statistics.median(teardown), 1),
        "mib": mib,
        "private_mib_per_s": round(mib / through_pasta, 1),
        "host_mib_per_s": round(mib / direct, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(run(args.tasks, args.mib)))


if __name__ == "__main__":
    main()
