"""An interactive job on a strict node: the terminal's program is confined like any task (its
org's uid, the task's cgroup, only its own GPUs), though the terminal host runs outside it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.bench.procs import fairgpu_command
from tests.cli.test_isolated_agent import PY, UID_BASE, Pool
from tests.harness.served import Served

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")


@pytest.fixture
def pool(served: Served, tmp_path: Path) -> Iterator[Pool]:
    p = Pool(served, tmp_path)
    yield p
    p.close()


def test_a_pty_session_on_a_strict_node_is_the_tasks_sandbox(pool: Pool) -> None:
    probe = f"""
import json, os
def attempt(path):
    try:
        os.close(os.open(path, os.O_RDWR))
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
mine = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
others = [i for i in range(4) if str(i) not in mine]
print(json.dumps({{
    "uid": os.getuid(),
    "tty": os.ttyname(0),
    "cgroup": open("/proc/self/cgroup").read(),
    "mine": sorted(attempt("{pool.dev}/nvidia" + i) for i in mine),
    "others": sorted({{attempt(f"{pool.dev}/nvidia{{i}}") for i in others}}),
    "state": os.path.isdir("{pool.state}/tasks"),
}}))
"""
    result = subprocess.run(
        [*fairgpu_command(), "run", "--pty", "-G", "H100:1", "-t", "5m", "--", PY, "-c", probe],
        env={**os.environ, **pool.served.env(pool.tokens["acme"])},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (out, result.stderr.decode())
    seen = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert seen["uid"] == UID_BASE + pool.org_ids["acme"]
    assert seen["tty"].startswith("/dev/pts/")
    assert pool.cgroup_parent in seen["cgroup"]
    assert "task-" in seen["cgroup"]
    assert seen["mine"] == ["OSError"]  # reached: no driver behind the test's device file
    assert seen["others"] == ["PermissionError"]
    assert seen["state"] is False  # the agent's state (and the terminal's socket) is hidden
