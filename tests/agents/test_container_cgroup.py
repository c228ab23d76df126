"""A docker or podman task's container below its task's cgroup (`--cgroup-parent`,
agents/containertask.py), with the real docker daemon and the real podman, as root: the task's
limits bound it, huge pages among them, which no flag of docker's or podman's bounds, and
stopping the task ends it and leaves no cgroup behind (podman's conmon's among them)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agents.cgroups import HUGETLB, _cgroup_roots
from agents.container import container_name
from tests.agents.helpers import docker_unusable, spec, wait_for
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ACME, PY, UID_BASE
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="docker tasks need root")


def _sleeping_container(net: NetNode, img: str, client: str) -> tuple[int, str]:
    """Task TASK's container, started sleeping: its first process's pid and its name. Where
    the runtime's cgroup driver is not cgroupfs the agent places no container below its task:
    not usable for these tests (a failure where CI requires the runtime)."""
    containers = net.runner.containers
    if containers.works and containers.cgroup_driver != "cgroupfs":  # `works` asks the runtime
        docker_unusable(f"its cgroup driver is {containers.cgroup_driver}", client)
    name = container_name(net.runner.tag, TASK)
    net.runner.start(spec(TASK, ["/bin/sleep", "600"], image=img, gpus=[], network="host", **ACME))
    wait_for(lambda: _container_pid(client, name) > 0 or net._ended(TASK), 90)
    pid = _container_pid(client, name)
    assert pid > 0, net.result(TASK)
    return pid, name


def _container_pid(client: str, name: str) -> int:
    done = subprocess.run(
        [client, "inspect", "--format", "{{.State.Pid}}", name], capture_output=True, text=True
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def _cgroups_of(pid: int) -> dict[str, str]:
    """The process's cgroup by controller ("" for the unified hierarchy)."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _gone(client: str, name: str) -> bool:
    done = subprocess.run([client, "inspect", name], capture_output=True)
    return done.returncode != 0


@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_a_container_tasks_container_is_below_its_tasks_cgroup_and_ends_with_it(
    node: NetNode,  # noqa: F811
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: str,  # noqa: F811
) -> None:
    """Before, the container was docker's own (/docker/<id>), podman's (/libpod_parent/...): a
    task's container could map the node's whole huge page pool, and its processes counted
    against none of the task's limits."""
    net = docker_node
    cgroups = net.confinement.cgroups
    assert cgroups is not None
    pid, name = _sleeping_container(net, image, runtime)
    parent = cgroups.container_parent(TASK)
    assert HUGETLB in parent.bounded, parent
    assert "pids" in parent.bounded, parent
    joined = _cgroups_of(pid)
    group = cgroups.task(TASK)
    for controller in parent.bounded:
        # v1 names each controller; the unified hierarchy (v2, a hybrid's hugetlb) is "".
        path = joined.get(controller, joined[""])
        assert path.startswith(parent.path + "/"), (controller, path, parent)
    limits = net.confinement.limits(spec(TASK, gpus=[], **ACME))
    if "memory" not in parent.bounded:
        # v1 where the agent's memory cgroup is not its other controllers' (this test host):
        # docker's --memory gives the container the task's limit, on the container alone.
        limit = Path("/sys/fs/cgroup/memory", joined["memory"].lstrip("/"), "memory.limit_in_bytes")
        assert int(limit.read_text()) == limits.memory_bytes
    # The task's own directory holds none of the container's processes (docker's client runs
    # outside it), yet counts them: the limits below are the task's, charged hierarchically.
    pids_dir = getattr(group, "paths", {}).get("pids", getattr(group, "path", None))
    assert pids_dir is not None
    assert int((pids_dir / "pids.current").read_text()) >= 1
    assert (pids_dir / "pids.max").read_text().strip() == str(limits.pids_max)
    hugetlb_dir = getattr(group, "paths", {}).get(HUGETLB, getattr(group, "path", None))
    assert hugetlb_dir is not None
    files = sorted(hugetlb_dir.glob("hugetlb.*.max"))
    assert files, "the task's cgroup has no huge page limits"
    for limit in files:
        size = limit.name.split(".")[1]
        assert limit.read_text().strip() == str(limits.hugetlb_bytes.get(size, 0)), limit
    net.runner.stop(TASK, grace_s=0, reason="done")
    wait_for(lambda: _gone(runtime, name), 60)
    net.result(TASK, timeout_s=60)
    net.confinement.finish(TASK)
    left = [root / parent.path.lstrip("/") for root in _cgroup_roots()]
    assert [path for path in left if path.exists()] == []


READ_CGROUPS = """
import json, sys
out = []
for path in sys.argv[1:]:
    try:
        open(path).read()
        out.append("allowed")
    except OSError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_another_org_cannot_read_a_container_tasks_container_cgroups(
    node: NetNode,  # noqa: F811
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: str,  # noqa: F811
) -> None:
    """runc makes the container's cgroup in every hierarchy, under the task's path: on cgroup
    v1 those the task has no directory in (blkio, cpuset, devices, ...) were runc's, readable by
    any uid, and another org read the container's disk I/O, CPUs and devices there."""
    net = docker_node
    cgroups = net.confinement.cgroups
    assert cgroups is not None
    pid, name = _sleeping_container(net, image, runtime)
    parent = cgroups.container_parent(TASK).path
    joined = _cgroups_of(pid)
    files = sorted(
        {
            str(Path(root, path.lstrip("/"), "cgroup.procs"))
            for root in _cgroup_roots()
            for path in joined.values()
            if path.startswith(parent + "/") and Path(root, path.lstrip("/")).is_dir()
        }
    )
    assert len(files) > 1, joined
    # podman's conmon, which watches the container, has a cgroup of its own under the path too
    conmon = [Path(root, parent.lstrip("/"), "conmon", "cgroup.procs") for root in _cgroup_roots()]
    files += [str(path) for path in conmon if path.exists()]
    assert runtime != "podman" or any("/conmon/" in f for f in files), files
    rival = UID_BASE + 2
    done = subprocess.run(
        [PY, "-c", READ_CGROUPS, *files],
        capture_output=True,
        text=True,
        user=rival,
        group=rival,
        extra_groups=[],
        check=True,
        timeout=30,
    )
    assert set(json.loads(done.stdout)) == {"PermissionError"}, dict(
        zip(files, json.loads(done.stdout), strict=True)
    )
    net.runner.stop(TASK, grace_s=0, reason="done")
    wait_for(lambda: _gone(runtime, name), 60)
    net.result(TASK, timeout_s=60)
    net.confinement.finish(TASK)
