"""The end of a test's `fairgpu agent --isolation strict` process and of all it left: its task
uids' processes (tasks outlive their agent by design), its network namespaces and wall, and its
task cgroups in every hierarchy. tests/cli/test_isolated_agent.py and tests/gpu use it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO

import psutil

from agents.netopen import remove_all


def end_strict_agent(
    agent: subprocess.Popen[bytes],
    log: IO[bytes],
    *,
    uids: range,
    state: Path,
    cgroup_parent: str,
) -> None:
    agent.terminate()
    try:
        agent.wait(timeout=15)
    finally:
        log.close()
    left = [
        proc
        for proc in psutil.process_iter(["uids"])
        if proc.info["uids"] and proc.info["uids"].real in uids
    ]
    for proc in left:
        proc.kill()
    # A killed process leaves its cgroup only once it has exited.
    psutil.wait_procs(left, timeout=10)
    remove_all(state, cgroup_parent)
    for controller_dir in Path("/sys/fs/cgroup").rglob(cgroup_parent):
        for task in controller_dir.glob("task-*"):
            task.rmdir()
        controller_dir.rmdir()
