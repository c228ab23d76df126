"""`fairgpu server --workers 2` as a real process tree: two HTTP workers and a scheduler process.

Timer cycles and long-poll re-checks are set ten minutes apart, so a job submitted to whichever
worker reaches its node's held heartbeat within seconds only if the workers and the scheduler
process tell each other through PostgreSQL. Every scrape, whichever worker answers it, shows the
scheduler process's instruments. A scheduler process that dies is started again; SIGTERM to the
server stops the whole tree and releases the lease.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.served import seed_admin

FAIRGPU = str(Path(sys.executable).parent / "fairgpu")
FAR_S = "600"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` still alive (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _scheduler_pids(server: int) -> set[int]:
    return {p for p in _children(server) if "scheduler.process" in _cmdline(p)}


def _until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = _free_port()
    env = {
        **os.environ,
        "FAIRGPU_CYCLE_INTERVAL_S": FAR_S,
        "FAIRGPU_LONG_POLL_RECHECK_S": FAR_S,
        "FAIRGPU_LEASE_TIMEOUT_S": "3",
        "FAIRGPU_DATABASE_POOL_SIZE": "3",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [FAIRGPU, "server", "--port", str(port), "--database-url", database_url,
         "--workers", "2", "--no-access-log", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return httpx.get(base + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until(ready, 60, "the server is ready")
        yield proc, base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_workers_and_a_scheduler_process(
    database_url: str, server: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, base = server
    with httpx.Client(base_url=base, timeout=30) as http:
        _exercise(proc, database_url, http)


def _exercise(proc: subprocess.Popen[bytes], database_url: str, http: httpx.Client) -> None:
    admin = {"Authorization": f"Bearer {seed_admin(database_url)}"}
    first = _until(lambda: _scheduler_pids(proc.pid), 30, "a scheduler process")
    assert len(first) == 1

    # Any worker's scrape shows the scheduler process leading and cycling.
    def leading() -> bool:
        text = http.get("/metrics").text
        cycles = _metric(text, 'fairgpu_scheduling_cycles_total{result="ok"}') or 0
        return _metric(text, "fairgpu_scheduler_leader") == 1.0 and cycles >= 1

    # The gauge says leader once the lease is taken, before the first cycle has ended: wait
    # for both (the first cycle is slow on a loaded machine).
    _until(leading, 30, "the scheduler process leads and has cycled")
    for _ in range(6):
        text = http.get("/metrics").text
        assert _metric(text, "fairgpu_scheduler_leader") == 1.0
        assert (_metric(text, 'fairgpu_scheduling_cycles_total{result="ok"}') or 0) >= 1
    assert http.get("/readyz").json()["scheduler_leader"] is False  # the workers never lead

    # Set up an org and a two-GPU node, hold its heartbeat, submit: the task arrives at once.
    assert http.post("/v1/orgs", json={"name": "acme"}, headers=admin).status_code == 201
    quota = {"guaranteed": 2, "limit": None}
    assert http.put("/v1/orgs/acme/quota/H100", json=quota, headers=admin).is_success
    user = http.post("/v1/users", json={"name": "ann", "org": "acme"}, headers=admin).json()
    token = http.post("/v1/tokens", json={"name": "t", "user_id": user["id"]}, headers=admin)
    member = {"Authorization": f"Bearer {token.json()['token']}"}
    join = http.post("/v1/join-tokens", json={"name": "j"}, headers=admin).json()["token"]
    gpus = [
        {"index": i, "uuid": f"GPU-n1-{i}", "model": "H100", "memory_bytes": 80 << 30}
        for i in range(2)
    ]
    node = http.post(
        "/v1/agent/register",
        json={"name": "n1", "site": "dc1", "domain": "r1", "hostname": "n1",
              "address": "10.0.0.1", "agent_version": "test", "gpus": gpus},
        headers={"Authorization": f"Bearer {join}"},
    ).json()  # fmt: skip
    agent = {"Authorization": f"Bearer {node['credential']}"}
    assert http.post("/v1/agent/heartbeat", json={}, headers=agent).status_code == 200

    replies: list[dict[str, Any]] = []
    for attempt in range(2):  # each submission lands on whichever worker takes it
        held: list[httpx.Response] = []
        holder = threading.Thread(target=_hold, args=(http, agent, held))
        holder.start()
        time.sleep(0.5)
        began = time.monotonic()
        job = http.post(
            "/v1/jobs",
            json={"command": ["true"], "time_limit": 60, "gpus_per_node": 2 - attempt},
            headers=member,
        ).json()
        holder.join(25)
        assert held, "the held heartbeat never came back"
        assert held[0].status_code == 200
        elapsed = time.monotonic() - began
        reply = held[0].json()
        assert [s["job_id"] for s in reply["start"]] == [job["id"]], reply
        # Woken, not ended by the poll's 25 s cap: the bound tells the two apart, it times
        # nothing (a loaded CI worker may take seconds to submit and cycle).
        assert elapsed < 15.0, elapsed
        replies.append(reply)
        task = reply["start"][0]
        done = {"task_id": task["task_id"], "job_id": job["id"], "state": "exited", "exit_code": 0}
        finished = http.post("/v1/agent/heartbeat", json={"tasks": [done]}, headers=agent)
        assert finished.status_code == 200

    # The scheduler process dies: another is started and leads again.
    (dead,) = first
    os.kill(dead, signal.SIGKILL)
    second = _until(lambda: _scheduler_pids(proc.pid) - {dead}, 30, "a new scheduler process")
    assert len(second) == 1
    _until(leading, 30, "the new scheduler process leads")

    # SIGTERM stops the whole tree.
    tree = _children(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(40) == 0
    _until(lambda: not _alive(tree), 10, "every process gone")


def _hold(http: httpx.Client, agent: dict[str, str], into: list[httpx.Response]) -> None:
    into.append(http.post("/v1/agent/heartbeat", json={"wait_s": 30}, headers=agent))


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [(["--workers", "2"], "--workers > 1"), (["--scheduler-process"], "--scheduler-process")],
)
def test_several_processes_need_postgresql(tmp_path: Path, flags: list[str], refusal: str) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    r = subprocess.run(
        [FAIRGPU, "server", "--database-url", url, *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"fairgpu: error: {refusal} needs PostgreSQL"
    assert not (tmp_path / "f.db").exists()  # refused before touching anything
