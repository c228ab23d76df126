"""The idle timeout of interactive jobs end to end: the real server, a real `fairgpu agent`
process with simulated GPUs and the CLI on a real pty, on SQLite and PostgreSQL. The org's
idle timeout is a few seconds here; what each test asserts is an order of events (a warning,
then the end) or that a session outlived its timeout doing something, never a duration."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.bench.procs import Fleet
from tests.cli.test_interactive import Org, Terminal, agent, org  # noqa: F401 - fixtures
from tests.harness.served import Served, wait_for

IDLE_S = 6
WARNING = r"no input and no GPU use for \S+; it ends in \S+ unless you type something"

# Silent unless typed to; `quit` ends it with 5.
QUIET = """
import sys
print("ready", flush=True)
for line in sys.stdin:
    print("got=" + line.strip(), flush=True)
    if line.strip() == "quit":
        sys.exit(5)
"""

# Keeps its (simulated) GPU busy and says nothing for three idle timeouts, then ends with 7.
BUSY = f"""
import os, time
with open(os.path.join(os.environ["HOME"], ".fairgpu-simulated-utilization"), "w") as f:
    f.write("0.9")
print("busy", flush=True)
time.sleep({3 * IDLE_S})
print("survived", flush=True)
raise SystemExit(7)
"""


def _idle_org(served: Served) -> None:
    served.ok("org", "update", "acme", "--interactive-idle-timeout", f"{IDLE_S}s")
    shown = json.loads(served.ok("org", "get", "acme", "-o", "json"))
    assert shown["interactive_idle_timeout_s"] == IDLE_S


def _describe(served: Served, job: str) -> dict[str, Any]:
    return dict(json.loads(served.ok("describe", job, "-o", "json")))


def _session(served: Served, people: Org, program: str) -> Terminal:
    """`run --pty` of `program` in an org whose idle timeout is IDLE_S."""
    _idle_org(served)
    return Terminal.start(
        served, people.owner, "run", "--pty", "-G", "H100:1", "-t", "10m", "--",
        "python3", "-u", "-c", program, rows=30, cols=100,
    )  # fmt: skip


def test_a_silent_session_is_warned_then_ended(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    run = _session(served, org, QUIET)
    job = run.expect(r"job (\d+) submitted")[1]
    run.expect(r"ready")
    run.expect(WARNING)  # first the warning, on the terminal
    run.expect(r"ending this session: no input and no GPU use for 6s \(idle timeout\)")
    assert run.wait() == 128 + 15, run.seen  # SIGTERM from the agent's stop
    wait_for(lambda: _describe(served, job)["state"] == "TIMEOUT")
    described = _describe(served, job)
    assert "idle timeout: no input and no GPU use for 6 s" in json.dumps(described["events"])
    # The warning is in the job's log too, for whoever was not attached.
    assert re.search(WARNING, served.ok("logs", job, token=org.owner))


def test_a_typing_session_is_not_ended(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    run = _session(served, org, QUIET)
    job = run.expect(r"job (\d+) submitted")[1]
    run.expect(r"ready")
    # Each line waits for the previous one's echo: input never stops for a whole timeout,
    # and the lines together outlast three of them.
    for number in range(3 * IDLE_S):
        run.type(f"line{number}\r".encode())
        run.expect(rf"got=line{number}\b")
        time.sleep(1.0)  # pacing, no assertion: a person typing
    run.type(b"quit\r")
    assert run.wait() == 5, run.seen
    assert "no input and no GPU use" not in run.seen
    wait_for(lambda: _describe(served, job)["state"] == "FAILED")  # exit code 5, not TIMEOUT


def test_a_session_whose_gpu_is_busy_is_not_ended(
    served: Served,
    org: Org,  # noqa: F811
    agent: object,  # noqa: F811
) -> None:
    run = _session(served, org, BUSY)
    run.expect(r"busy")
    run.expect(r"survived", timeout_s=120)
    assert run.wait() == 7, run.seen
    assert "no input and no GPU use" not in run.seen


# Rank 1 keeps its (simulated) GPU busy until the job ends; rank 0, where the terminal is, does
# nothing and says nothing for three idle timeouts, then ends with 7 (which ends rank 1).
ELSEWHERE = f"""
import os, time
rank = os.environ["FAIRGPU_NODE_RANK"]
print("rank", rank, "up", flush=True)
if rank != "0":
    with open(os.path.join(os.environ["HOME"], ".fairgpu-simulated-utilization"), "w") as f:
        f.write("0.9")
    time.sleep(600)
time.sleep({3 * IDLE_S})
print("survived", flush=True)
raise SystemExit(7)
"""


@pytest.fixture
def two_nodes(served: Served, tmp_path: Path) -> Iterator[None]:
    """Two real `fairgpu agent` processes (n1, n2), one simulated H100 each."""
    made = served.ok("join-token", "create", "--uses", "2", "-o", "json")
    join = json.loads(made)["token"]
    fleet = Fleet(workdir=tmp_path)
    try:
        for name in ("n1", "n2"):
            fleet.agent(
                name, served.url, join, "1xH100", log_level="warning", time_limit_grace_s=None
            )
        yield
    finally:
        fleet.close()


def test_a_session_whose_other_rank_uses_its_gpu_is_not_ended(
    served: Served,
    org: Org,  # noqa: F811
    two_nodes: None,
) -> None:
    """The terminal is on rank 0, the work on rank 1: GPU use anywhere in the job is use."""
    _idle_org(served)
    run = Terminal.start(
        served, org.owner, "run", "--pty", "-N", "2", "-G", "H100:1", "-t", "10m", "--",
        "python3", "-u", "-c", ELSEWHERE, rows=30, cols=100,
    )  # fmt: skip
    run.expect(r"rank 0 up", timeout_s=120)
    run.expect(r"survived", timeout_s=120)
    assert run.wait() == 7, run.seen
    assert "no input and no GPU use" not in run.seen
