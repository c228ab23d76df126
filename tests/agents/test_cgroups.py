"""Task cgroups: the real v1 hierarchy of this host, and v2's file protocol on a directory tree.

This host is cgroup v1 with an empty unified hierarchy ("hybrid"), so v2's limits cannot be
exercised for real here: its test lays out the files a v2 kernel shows and checks what the agent
writes and reads there (the kernel's side is the boundary we do not own). The unified hierarchy
does hold processes, so how a v2 task cgroup is ended and removed is tested on it for real.
(tests/gpu runs the isolation suite on a cgroup v2 GPU machine.)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agents.cgroups import CgroupError, Limits, _levels_to_seal, _V2Task, open_hierarchy

LIMITS = Limits(memory_bytes=256 * 2**20, pids_max=100, cpu_weight=200)


def test_v2_hands_controllers_down_and_writes_the_limits(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    for level in ("system.slice", "system.slice/fairgpu-agent.service"):
        (root / level).mkdir()
        (root / level / "cgroup.subtree_control").write_text("")
    (root / "system.slice/fairgpu-agent.service/tasks").mkdir()
    (root / "system.slice/fairgpu-agent.service/tasks/cgroup.subtree_control").write_text("")

    hierarchy = open_hierarchy("system.slice/fairgpu-agent.service/tasks", root=root)
    assert hierarchy.version == 2
    # Each level enables for its children what it does not already.
    assert (root / "cgroup.subtree_control").read_text() == "+pids +cpu +hugetlb"
    for level in ("system.slice", "system.slice/fairgpu-agent.service"):
        assert (root / level / "cgroup.subtree_control").read_text() == (
            "+memory +pids +cpu +hugetlb"
        )

    task = root / "system.slice/fairgpu-agent.service/tasks/task-7"
    task.mkdir()  # with the hugetlb files the kernel shows, one pair per pool
    for size in ("2MB", "1GB"):
        (task / f"hugetlb.{size}.max").write_text("max\n")
        (task / f"hugetlb.{size}.rsvd.max").write_text("max\n")
    group = hierarchy.create(7, dataclasses.replace(LIMITS, hugetlb_bytes={"2MB": 2**23}))
    assert {f.name: f.read_text() for f in task.iterdir()} == {
        "memory.max": str(256 * 2**20),
        "pids.max": "100",
        "cpu.weight": "200",
        # Its share of the 2 MiB pool, and none of a pool it has no share of.
        "hugetlb.2MB.max": str(2**23),
        "hugetlb.2MB.rsvd.max": str(2**23),
        "hugetlb.1GB.max": "0",
        "hugetlb.1GB.rsvd.max": "0",
    }
    assert group.procs_files == [task / "cgroup.procs"]
    assert not group.oom_killed()
    (task / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    # The agent unit's TasksMax bounds every task: the lowest pids.max above them.
    assert hierarchy.pids_ceiling() is None
    (root / "system.slice/fairgpu-agent.service/pids.max").write_text("4915\n")
    (root / "system.slice/pids.max").write_text("max\n")
    (root / "system.slice/fairgpu-agent.service/tasks/pids.max").write_text("9000\n")
    assert hierarchy.pids_ceiling() == 4915


def test_the_levels_summing_tasks_are_sealed_up_to_where_the_agent_branches_off(
    tmp_path: Path,
) -> None:
    """The parent's own files (and those of each level above that holds the agent and its
    tasks alone) sum the tasks: read by root alone, so a rival's figure is not the sum minus
    one's own. The levels above the agent's unit are the host's and stay as they are."""
    root = tmp_path / "cgroup"
    unit = root / "system.slice/fairgpu-agent.service"
    tasks = unit / "tasks"
    # A systemd unit with DelegateSubgroup=agent: the agent beside its tasks.
    assert _levels_to_seal(tasks, root, unit / "agent") == [tasks, unit]
    # An agent started from a shell elsewhere: every level the parent names.
    assert _levels_to_seal(tasks, root, root / "user.slice/session-1.scope") == [
        tasks,
        unit,
        root / "system.slice",
    ]
    assert _levels_to_seal(root / "fairgpu", root, None) == [root / "fairgpu"]
    assert _levels_to_seal(root, root, None) == []

    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "fairgpu").mkdir()
    for name in ("cgroup.subtree_control", "memory.current", "cpu.stat", "io.pressure"):
        (root / "fairgpu" / name).write_text("")
        (root / "fairgpu" / name).chmod(0o644)
    hierarchy = open_hierarchy("fairgpu", root=root)
    assert {f.name: f.stat().st_mode & 0o777 for f in (root / "fairgpu").iterdir()} == {
        "cgroup.subtree_control": 0o600,
        "memory.current": 0o600,
        "cpu.stat": 0o600,
        "io.pressure": 0o600,
    }
    # A controller enabled later brings files of its own: sealed by the next task's start.
    (root / "fairgpu/hugetlb.2MB.current").write_text("0")
    (root / "fairgpu/hugetlb.2MB.current").chmod(0o444)
    hierarchy.create(1, LIMITS)
    assert (root / "fairgpu/hugetlb.2MB.current").stat().st_mode & 0o777 == 0o400
    assert (root / "cgroup.controllers").stat().st_mode & 0o777 == 0o644  # the host's


def test_a_parent_outside_the_hierarchy_is_refused(tmp_path: Path) -> None:
    for parent in ("../escape", "a/../../b", ""):
        with pytest.raises(CgroupError, match="relative path of names"):
            open_hierarchy(parent, root=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make cgroups")
def test_v1_limits_on_this_host() -> None:
    hierarchy = open_hierarchy(f"fairgpu-test-{uuid.uuid4().hex[:8]}")
    try:
        group = hierarchy.create(1, LIMITS)
        if hierarchy.version == 1:
            paths = group.paths  # type: ignore[attr-defined]
            assert (paths["memory"] / "memory.limit_in_bytes").read_text().strip() == str(
                256 * 2**20
            )
            assert (paths["pids"] / "pids.max").read_text().strip() == "100"
            assert (paths["cpu"] / "cpu.shares").read_text().strip() == "2048"
        assert group.pids() == []
        assert group.kill()
        group.remove()
        assert not group.exists()
    finally:
        hierarchy.remove()
    assert not any(p.exists() for p in hierarchy.parents())


def unified_hierarchy() -> Path:
    """The host's cgroup v2 hierarchy: beside v1's on a hybrid host (this one), the whole of
    /sys/fs/cgroup on a v2 host (the GPU machine tests/gpu runs on)."""
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.controllers").exists():
            return root
    pytest.fail("this host has no cgroup v2 hierarchy")


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_a_v2_task_is_removed_once_its_slow_exiting_process_has_exited() -> None:
    """A killed process leaves a v2 cgroup's `cgroup.procs` as it starts to exit but stays a
    member until it has, and the kernel refuses to delete a cgroup with members (EBUSY): on a
    GPU machine a CUDA process left by a task took long enough that the agent's poll raised and
    the task's directory stayed. Here the slow exit is 1.5 GiB to unmap."""
    parent = unified_hierarchy() / f"fairgpu-test-{uuid.uuid4().hex[:8]}"
    task = parent / "task-1"
    task.mkdir(parents=True)
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "b = bytearray(1536 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print('ready', flush=True)\n"
            "import time; time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        (task / "cgroup.procs").write_text(str(hog.pid))
        assert hog.stdout is not None
        assert hog.stdout.readline() == "ready\n"
        _V2Task(task).remove()
        assert not task.exists()
        assert hog.wait(timeout=10) == -9
    finally:
        hog.kill()
        hog.wait()
        if hog.stdout is not None:
            hog.stdout.close()
        for directory in (task, parent):
            if directory.exists():
                directory.rmdir()
