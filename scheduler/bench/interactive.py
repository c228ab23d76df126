"""`fairgpu bench interactive`: attach latency and relay throughput on an idle simulated cluster.

A real `fairgpu server` (one process) and a `fairgpu agent --simulate` (scheduler.bench.cluster),
driven through the real CLI as a user would:

- attach latency: `fairgpu run --pty -- sh -c 'echo READY; read x'` as a fresh process, from its
  start (the submission) to READY on its output: queueing, the agent starting the task, the
  stream's set-up through the heartbeat reply and the CLI's own start-up. One job at a time,
  each ended (a newline to its `read`) before the next.
- relay throughput: `fairgpu port-forward` to a job that listens on a TCP port, then
  `--megabytes` sent to the job (which counts them and answers) and as many read from it, each
  through one connection: every byte crosses the CLI, the server process and the agent.

With `replicas` 2 (PostgreSQL) the agent reports to a second server replica while the CLI uses
the first: every stream's agent side reaches the replica that does not hold its user side and
is relayed to it (api/relayhop.py), so both figures include that hop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scheduler.bench.cluster import add_org, cluster
from scheduler.bench.latency import GPU_MODEL, percentile, summarise
from scheduler.bench.procs import fairgpu_command, free_port

READY = b"FAIRGPU-BENCH-READY"
TIMEOUT_S = 60.0
CHUNK = 256 * 1024

# The job's side of the throughput runs: `PORT` listens; a client that sends "recv N\n" gets
# N bytes; "send N\n" followed by N bytes gets "ok\n" once they have all arrived.
_SINK = r"""
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
block = b"x" * 262144
while True:
    conn, _ = server.accept()
    with conn, conn.makefile("rb") as stream:
        request = stream.readline().split()
        if len(request) != 2:  # a probe that only connected
            continue
        verb, left = request[0], int(request[1])
        if verb == b"recv":
            while left > 0:
                conn.sendall(block[: min(left, len(block))])
                left -= min(left, len(block))
        else:
            while left > 0:
                got = stream.read1(min(left, 262144))
                if not got:
                    break
                left -= len(got)
            conn.sendall(b"ok\n")
"""


def _cli_env(url: str, token: str, home: Path) -> dict[str, str]:
    return {**os.environ, "FAIRGPU_SERVER": url, "FAIRGPU_TOKEN": token,
            "FAIRGPU_CONFIG_DIR": str(home)}  # fmt: skip


def _attach_once(env: dict[str, str]) -> float:
    """Seconds from `run --pty`'s start to the job's first line on its output."""
    command = ["sh", "-c", f"echo {READY.decode()}; read x"]
    started = time.monotonic()
    process = subprocess.Popen(
        [*fairgpu_command(), "run", "--pty", "-G", f"{GPU_MODEL}:1", "-t", "5m", "--", *command],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stdout, stdin = process.stdout, process.stdin
    assert stdout is not None
    assert stdin is not None
    seen = b""
    try:
        while READY not in seen:
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"run --pty ended before its prompt: {seen[-300:]!r}")
            seen += chunk
        latency = time.monotonic() - started
        stdin.write(b"\n")
        stdin.close()
        if process.wait(timeout=TIMEOUT_S) != 0:
            raise RuntimeError(f"run --pty exited {process.returncode}")
        return latency
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()


def _submit_sink(member: httpx.Client, port: int) -> int:
    # In the node's own network: the bench sees the sink listen on the host's loopback (a
    # one-node job left unsaid would get a network namespace of its own where the node can).
    body = {"name": "sink", "command": [sys.executable, "-c", _SINK, str(port)],
            "gpu_type": GPU_MODEL, "time_limit": 600, "network": "host"}  # fmt: skip
    r = member.post("/v1/jobs", json=body)
    if r.status_code != 201:
        raise RuntimeError(f"submit: {r.status_code} {r.text[:200]}")
    job_id: int = r.json()["id"]
    deadline = time.monotonic() + TIMEOUT_S
    while not _listening(port):
        if time.monotonic() > deadline:
            raise RuntimeError("the sink job did not listen in time")
        time.sleep(0.05)
    return job_id


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _transfer(local: int, verb: str, size: int) -> float:
    """Seconds to move `size` bytes through the forward (`send`: to the job)."""
    block = b"y" * CHUNK
    with socket.create_connection(("127.0.0.1", local), timeout=TIMEOUT_S) as conn:
        started = time.monotonic()
        conn.sendall(f"{verb} {size}\n".encode())
        if verb == "send":
            left = size
            while left > 0:
                conn.sendall(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
            if conn.makefile("rb").readline() != b"ok\n":
                raise RuntimeError("the job did not confirm the bytes")
        else:
            left = size
            while left > 0:
                got = conn.recv(CHUNK)
                if not got:
                    raise RuntimeError(f"the stream ended {left} bytes early")
                left -= len(got)
        return time.monotonic() - started


def _throughput(env: dict[str, str], job_id: int, port: int, megabytes: int) -> dict[str, Any]:
    forward = subprocess.Popen(
        [*fairgpu_command(), "port-forward", str(job_id), f"0:{port}"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        if not line.startswith("Forwarding"):
            raise RuntimeError(f"port-forward did not start: {line!r}")
        local = int(line.split()[1].rsplit(":", 1)[1])
        size = megabytes * 1_000_000
        _transfer(local, "send", 1_000_000)  # warm-up: the first stream's set-up
        to_job = _transfer(local, "send", size)
        from_job = _transfer(local, "recv", size)
        return {
            "megabytes": megabytes,
            "to_job_mb_s": round(megabytes / to_job, 1),
            "from_job_mb_s": round(megabytes / from_job, 1),
        }
    finally:
        forward.terminate()
        forward.wait(timeout=15)
        if forward.stdout is not None:
            forward.stdout.close()


def run_interactive_bench(
    *,
    sessions: int = 10,
    warmup: int = 1,
    megabytes: int = 200,
    database_url: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """Run both measurements on a fresh cluster; the JSON-ready result."""
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-bench-interactive-"))
    try:
        with cluster(
            workdir,
            nodes=[("bench-1", "bench", f"2x{GPU_MODEL}")],
            server_env={},
            database_url=database_url,
            replicas=replicas,
        ) as c:
            admin_headers = {"Authorization": f"Bearer {c.admin_token}"}
            with httpx.Client(base_url=c.url, headers=admin_headers, timeout=30) as admin:
                token = add_org(admin, "bench", quotas={GPU_MODEL: (2, 2)}, user="bench")
            c.wait_nodes()
            env = _cli_env(c.url, token, workdir / "cli")
            latencies = [_attach_once(env) for _ in range(warmup + sessions)][warmup:]
            port = free_port()
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=c.url, headers=headers, timeout=30) as member:
                job_id = _submit_sink(member, port)
                relay = _throughput(env, job_id, port, megabytes)
                member.post(f"/v1/jobs/{job_id}/cancel")
            c.fleet.check_alive()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "interactive",
        "database": "postgresql" if database_url and "postgres" in database_url else "sqlite",
        "replicas": replicas,
        "attach_latency": {
            "n": len(latencies),
            **summarise(latencies),
            "p50_ok": percentile(latencies, 0.5) <= 1.0,
        },
        "relay": relay,
        "unit": "s, MB/s (10^6 bytes)",
    }
