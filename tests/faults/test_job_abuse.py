"""Jobs that misbehave on a real agent: one floods its log, one forks children, one ignores
SIGTERM. The log cap holds on the node, the node keeps reporting, and stopping a job ends its
whole process group (SIGTERM, grace, SIGKILL)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
from sqlalchemy import func, select

from scheduler.bench.procs import wait_for
from scheduler.db import LogChunk, Task
from scheduler.db.engine import make_engine, make_sessionmaker
from tests.conftest import run_async
from tests.faults.helpers import Org, assert_invariants, fleet, setup_org

LOG_CAP_BYTES = 256 * 1024
SERVER_LOG_CAP_BYTES = 1024 * 1024
NODE_LOG_CAP_BYTES = 4 * SERVER_LOG_CAP_BYTES  # so that the server's cap is what bounds it
FLOOD = "import sys\nline = 'x' * 1023 + '\\n'\nwhile True:\n    sys.stdout.write(line)\n"
# Numbered lines until SIGTERM, then a last word: what a training job does when preempted. The
# handler only sets a flag (writing from it could re-enter a blocked write of the flood).
GRACEFUL_FLOOD = (
    "import signal, sys\n"
    "stop = []\n"
    "signal.signal(signal.SIGTERM, lambda *_: stop.append(1))\n"
    "i = 0\n"
    "while not stop:\n"
    "    sys.stdout.write(f'line {i:09d} ' + 'x' * 100 + '\\n'); i += 1\n"
    "sys.stdout.write('checkpoint saved\\n')\n"
)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a segment dropped between listing and looking
        return 0


def _log_sizes(state_dir: Path) -> list[int]:
    """Bytes of log on the node's disk per task, as at one instant: newest segment first (see
    tests/agents/test_logcap.py on_disk)."""
    tasks = state_dir / "tasks"
    return [
        sum(_size(p) for p in sorted(d.glob("log*"), reverse=True))
        for d in tasks.iterdir()
        if d.is_dir()
    ]


def _cancel(org: Org, job_id: int) -> None:
    r = org.member.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text


def test_flooding_forking_and_sigterm_ignoring_jobs(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fairgpu.db'}"
    with fleet(tmp_path, db) as f, ExitStack() as stack:
        url = f.server()
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        f.agent("n1", url, org.join_token, extra=("--log-max-bytes", str(LOG_CAP_BYTES)))
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        kids = tmp_path / "pids"

        flood = org.submit(command=[sys.executable, "-c", FLOOD], time_limit=8)
        forker = org.submit(
            command=[
                "sh", "-c",
                f'echo $$ >> {kids}/"$FAIRGPU_JOB_ID"; '
                f'for i in 1 2 3; do sleep 600 & echo $! >> {kids}/"$FAIRGPU_JOB_ID"; done; '
                f'(sleep 600 & echo $! >> {kids}/"$FAIRGPU_JOB_ID"; wait) & wait',
            ]
        )  # fmt: skip
        stubborn = org.submit(
            command=["sh", "-c", f'trap "" TERM; echo $$ >> {kids}/"$FAIRGPU_JOB_ID"; sleep 600']
        )
        org.wait_states([flood, forker, stubborn], {"RUNNING"}, timeout_s=40)
        wait_for("forker's 5 processes", lambda: len(org.live_pids(forker)) == 5, 20)
        wait_for("stubborn process", lambda: org.live_pids(stubborn), 20)

        # The flood runs into its time limit; meanwhile the log on disk stays near its cap.
        peak = 0
        state = tmp_path / "n1-state"
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and org.job(flood)["state"] == "RUNNING":
            peak = max([peak, *_log_sizes(state)])
            time.sleep(0.1)
        org.wait_states([flood], {"TIMEOUT"}, timeout_s=30)
        # The task writes through a copier that keeps at most the cap on disk at any time.
        assert 0 < peak <= LOG_CAP_BYTES, f"log reached {peak} bytes"
        assert max(_log_sizes(state)) <= LOG_CAP_BYTES
        logs = org.member.get(f"/v1/jobs/{flood}/logs", params={"tail": 4096})
        assert logs.status_code == 200, logs.text
        assert logs.json()["data"].endswith("Terminated\n"), logs.json()["data"][-200:]
        assert org.node_state("n1") == "ready", "the node kept reporting through the flood"

        _cancel(org, forker)
        _cancel(org, stubborn)
        org.wait_states([forker], {"CANCELLED"}, timeout_s=20)
        wait_for("forker's whole group gone", lambda: not org.live_pids(forker), 10)
        # SIGTERM is ignored: the grace (2 s) passes, then SIGKILL ends it.
        org.wait_states([stubborn], {"CANCELLED"}, timeout_s=30)
        wait_for("stubborn group gone", lambda: not org.live_pids(stubborn), 10)
        print(f"flood log peak on disk: {peak} bytes (cap {LOG_CAP_BYTES})")
        assert_invariants(db)


def _stored_log_bytes(database_url: str, job_id: int) -> int:
    """Bytes of log text the server holds for the job's tasks."""

    async def query() -> int:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                total = await session.scalar(
                    select(func.coalesce(func.sum(func.length(LogChunk.data)), 0))
                    .join(Task, Task.id == LogChunk.task_id)
                    .where(Task.job_id == job_id)
                )
                return int(total or 0)
        finally:
            await engine.dispose()

    return run_async(query)


def _session_pids(state_dir: Path) -> list[int]:
    """The processes of the node's tasks: every task leads a session of its own."""
    leaders = {
        json.loads(p.read_text())["pid"] for p in (state_dir / "tasks").glob("*/record.json")
    }
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) in leaders:
                found.append(proc.pid)
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _consecutive(lines: list[str]) -> bool:
    numbers = [int(line.split()[1]) for line in lines]
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_log_flood_through_an_agent_restart(tmp_path: Path, database_url: str) -> None:
    """A job floods its log while its agent is SIGKILLed and restarted, then is cancelled: it
    keeps running (no SIGPIPE), the node's disk and the server's table stay within their caps,
    and what it prints after SIGTERM is the end of the log the server serves."""
    with fleet(tmp_path, database_url) as f, ExitStack() as stack:
        url = f.server(
            FAIRGPU_TASK_LOG_MAX_BYTES=str(SERVER_LOG_CAP_BYTES),
            FAIRGPU_NODE_TIMEOUT_S="60",  # the restart below is not a node failure
            # The job ends at SIGTERM, once its last buffered lines are through the pipe; on a
            # crowded machine the log copier may not drain them within the fleet's 2 s grace,
            # and a SIGKILL then would cut the log this test reads mid-line.
            FAIRGPU_POLICY_PREEMPTION_GRACE_S="30",
        )
        org = stack.enter_context(setup_org(url, f.bootstrap(), tmp_path / "pids"))
        extra = ("--log-max-bytes", str(NODE_LOG_CAP_BYTES))
        agent = f.agent("n1", url, org.join_token, extra=extra)
        wait_for("node ready", lambda: org.node_state("n1") == "ready", 30)
        job = org.submit(command=[sys.executable, "-c", GRACEFUL_FLOOD])
        org.wait_states([job], {"RUNNING"}, timeout_s=40)
        state = tmp_path / "n1-state"
        wait_for(
            "the server holds more than its cap's worth of the flood, dropped",
            lambda: (
                org.member.get(f"/v1/jobs/{job}/logs", params={"tail": 1}).json()["next_offset"]
                > 2 * SERVER_LOG_CAP_BYTES
            ),
            30,
        )

        peak_disk = peak_server = 0

        def sample() -> None:
            nonlocal peak_disk, peak_server
            peak_disk = max([peak_disk, *_log_sizes(state)])
            peak_server = max(peak_server, _stored_log_bytes(database_url, job))

        sample()
        at_kill = org.member.get(f"/v1/jobs/{job}/logs", params={"tail": 1}).json()
        agent.kill()  # mid-flood
        task_pids = _session_pids(state)
        assert len(task_pids) >= 3, task_pids  # wrapper, job, copier
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            sample()
            time.sleep(0.05)
        assert all(_alive(pid) for pid in task_pids), "the job died with its agent"
        f.agent("n1", url, org.join_token, extra=extra)  # same state dir: adopts the job
        wait_for("node ready again", lambda: org.node_state("n1") == "ready", 30)
        for _ in range(20):
            sample()
            time.sleep(0.1)
        assert org.job(job)["state"] == "RUNNING"

        _cancel(org, job)
        org.wait_states([job], {"CANCELLED"}, timeout_s=30)
        sample()
        wait_for("the job's processes gone", lambda: not any(map(_alive, task_pids)), 10)
        assert 0 < peak_disk <= NODE_LOG_CAP_BYTES, peak_disk
        assert 0 < peak_server <= SERVER_LOG_CAP_BYTES, peak_server

        logs = f"/v1/jobs/{job}/logs"
        # The log's last chunks may come heartbeats after the end: `eof` says when they have.
        wait_for(
            "the whole log on the server",
            lambda: org.member.get(logs, params={"tail": 1}).json()["eof"],
            30,
        )
        tail = org.member.get(logs, params={"tail": 8192}).json()
        assert tail["eof"] is True
        assert tail["data"].endswith("\ncheckpoint saved\n"), tail["data"][-300:]
        assert _consecutive(tail["data"].splitlines()[1:-1])
        head = org.member.get(logs, params={"offset": 0}).json()
        assert head["data"].startswith("[fairgpu: "), head["data"][:200]
        assert "bytes of log dropped on the server (size cap)]" in head["data"].split("\n")[0]
        # Following from the start reaches the same end.
        offset, pages = 0, []
        for _ in range(200):
            page = org.member.get(logs, params={"offset": offset}).json()
            pages.append(page["data"])
            offset = page["next_offset"]
            if page["eof"]:
                break
        assert offset == tail["next_offset"] > at_kill["next_offset"] + SERVER_LOG_CAP_BYTES
        assert "".join(pages).endswith(tail["data"])
        print(
            f"flood through an agent restart: {offset} bytes written, peak on disk {peak_disk} "
            f"(cap {NODE_LOG_CAP_BYTES}), peak stored on the server {peak_server} "
            f"(cap {SERVER_LOG_CAP_BYTES})"
        )
        assert_invariants(database_url)
