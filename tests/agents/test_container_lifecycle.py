"""A docker or podman task's container from its start to its end, with the real docker daemon and
the real podman, as root: under strict isolation it runs as its org's uid with no capabilities,
no way to gain privileges, an IPC namespace of its own and its task's limits; it gets its job's
warning signal; a cancel ends it, ignoring SIGTERM or not; and nothing of it stays behind (the
runtime's container, its storage, its cgroups, its variables' files)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agents.container import Runtime, container_name
from agents.disk import DiskConfig
from agents.runner import Runner, RunnerConfig
from protocol.agent import TaskSignal
from tests.agents.helpers import spec, wait_for
from tests.agents.test_container_netns import (  # noqa: F401 - fixtures
    TASK,
    docker_node,
    image,
    runtime,
)
from tests.agents.test_isolation import ACME, UID_BASE
from tests.agents.test_netns import NetNode, node  # noqa: F401 - the fixtures

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="container tasks need root")

STORAGE = {
    "docker": Path("/var/lib/docker/containers"),
    "podman": Path("/var/lib/containers/storage/overlay-containers"),
}
"""Where each runtime keeps a container's own files, in a directory named by its id."""


def _inspect(client: str, name: str, field: str) -> str:
    done = subprocess.run(
        [client, "inspect", "--format", "{{" + field + "}}", name], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _running_id(net: NetNode, client: str) -> str:
    """The task's container's id, once it runs."""
    name = container_name(net.runner.tag, TASK)
    wait_for(lambda: _inspect(client, name, ".State.Running") == "true" or net._ended(TASK), 90)
    container = _inspect(client, name, ".Id")
    assert container, net.result(TASK)
    return container


def _log(net: NetNode) -> str:
    return net.state.read_log(net.runner.records[TASK]).decode()


def _left(client: str, container: str) -> list[str]:
    """What of the container is left: the runtime's record, its storage, its cgroups."""
    left = []
    if subprocess.run([client, "inspect", container], capture_output=True).returncode == 0:
        left.append(f"{client} still has {container}")
    if (STORAGE[client] / container).exists():
        left.append(str(STORAGE[client] / container))
    found = subprocess.run(
        ["find", "/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name", f"*{container}*"],
        capture_output=True,
        text=True,
    )
    return left + found.stdout.split()


@pytest.mark.parametrize("node", ["strict"], indirect=True)
def test_a_strict_container_task_is_its_orgs_uid_without_privileges_within_its_limits(
    node: NetNode,  # noqa: F811
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
) -> None:
    net = docker_node
    script = (
        "id -u; grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status; "
        "readlink /proc/self/ns/ipc; cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
        "/sys/fs/cgroup/pids/pids.max"
    )
    task = spec(TASK, ["sh", "-c", script], image=image, gpus=[], network="host", **ACME)
    net.runner.start(task)
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    limits = net.confinement.limits(task)
    lines = result["log"].split("\n")
    assert lines[0] == str(UID_BASE + ACME["org_id"]), result
    none = "0000000000000000"
    assert lines[1:4] == [f"CapPrm:\t{none}", f"CapEff:\t{none}", "NoNewPrivs:\t1"], result
    assert lines[4] != os.readlink("/proc/self/ns/ipc"), result  # not the node's IPC namespace
    assert lines[5:7] == [str(limits.memory_bytes), str(limits.pids_max)], (result, limits)


def test_a_container_task_gets_its_warning_signal(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: str,  # noqa: F811
) -> None:
    """Through `docker kill --signal` or `podman kill --signal` to the container's init, which
    hands it to the job's command."""
    net = docker_node
    script = "trap 'echo got USR1; exit 5' USR1; echo ready; while :; do sleep 0.1; done"
    # The stop's warning, not yet the time limit's.
    warning = TaskSignal(name="USR1", lead_s=30)
    task = spec(
        TASK, ["sh", "-c", script], image=image, gpus=[], network="host",
        time_limit_s=600, signal=warning, **ACME,
    )  # fmt: skip
    net.runner.start(task)
    container = _running_id(net, runtime)
    wait_for(lambda: "ready" in _log(net) or net._ended(TASK), 30)
    assert net.runner.stop(TASK, grace_s=60, reason="preempted", warn=True)
    result = net.result(TASK, timeout_s=60)
    assert result["log"] == "ready\ngot USR1\n", result
    assert result["exit_code"] == 5, result
    wait_for(lambda: not _left(runtime, container), 30)


@pytest.mark.parametrize("ignores", [False, True])
def test_a_cancelled_container_task_ends_and_leaves_nothing_behind(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: str,  # noqa: F811
    ignores: bool,
) -> None:
    """SIGTERM reaches the command through the runtime's client; one that ignores it is killed
    after the grace period (the client killed, then `kill` through the runtime). Either way the
    runtime removes the container (`--rm`), its storage and its cgroups, and the agent the
    directory of its variables."""
    net = docker_node
    trap = "trap '' TERM" if ignores else "trap 'echo got TERM; exit 3' TERM"
    script = f"{trap}; echo ready; while :; do sleep 0.1; done"
    task = spec(
        TASK, ["sh", "-c", script], image=image, gpus=[], network="host",
        env={"TOKEN": "t"}, **ACME,
    )  # fmt: skip
    net.runner.start(task)
    container = _running_id(net, runtime)
    assert (net.runner.container_env.root / str(TASK)).exists()
    wait_for(lambda: "ready" in _log(net) or net._ended(TASK), 30)
    assert net.runner.stop(TASK, grace_s=2, reason="cancelled")
    result = net.result(TASK, timeout_s=60)
    if ignores:
        assert result["log"] == "ready\n", result
    else:
        assert result["log"] == "ready\ngot TERM\n", result
    wait_for(lambda: not _left(runtime, container), 30)
    assert not (net.runner.container_env.root / str(TASK)).exists()


def test_a_container_filling_its_writable_layer_is_ended_at_its_disk_limit(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: Runtime,  # noqa: F811
) -> None:
    """The container's writable layer (overlay's upper directory, which `inspect` names, as
    docker's and podman's do alike) counts against the task's disk limit."""
    net = docker_node
    limits = DiskConfig(task_max_bytes=4 * 2**20, node_reserve_bytes=0)
    config = RunnerConfig(container_runtime=runtime, disk=limits)
    net.runner = Runner(net.state, config, confinement=net.confinement)
    script = "head -c 8388608 /dev/zero > /tmp/fill && sync && echo filled; sleep 120"
    task = spec(TASK, ["sh", "-c", script], image=image, gpus=[], network="host", **ACME)
    net.runner.start(task)
    container = _running_id(net, runtime)
    wait_for(lambda: "filled" in _log(net) or net._ended(TASK), 60)
    wait_for(net.runner.check_disk, 30)
    result = net.result(TASK, timeout_s=60)
    assert result["state"] == "stopped", result
    assert result["reason"].startswith("disk limit: the task holds "), result
    wait_for(lambda: not _left(runtime, container), 30)


def test_an_interactive_container_task_has_a_terminal_in_its_own_network(
    docker_node: NetNode,  # noqa: F811
    image: str,  # noqa: F811
    runtime: Runtime,  # noqa: F811
) -> None:
    """`--interactive --tty`: the runtime's terminal inside the container, joined to the task's
    pty; and a private one runs in its task's namespace (podman's joined by path, docker's
    through its pod), its client in the node's."""
    net = docker_node
    config = RunnerConfig(
        container_runtime=runtime, container_pause_image=image, pty_attach_wait_s=0.2
    )
    net.runner = Runner(net.state, config, confinement=net.confinement)
    script = "[ -t 0 ] && [ -t 1 ] && echo tty; readlink /proc/self/ns/net"
    task = spec(
        TASK, ["sh", "-c", script], image=image, gpus=[], network="private", pty=True, **ACME
    )
    net.runner.start(task)
    wait_for(lambda: net.namespaces.exists(TASK) or net._ended(TASK), 60)
    inode = os.stat(net.namespaces.path(TASK)).st_ino
    result = net.result(TASK, timeout_s=90)
    assert result["exit_code"] == 0, result
    assert result["log"].replace("\r\n", "\n") == f"tty\nnet:[{inode}]\n", result
