"""A container task's private network (agents/container.py's pod for docker, the namespace by
path for podman, agents/netns.py's namespace), with the real docker daemon and the real podman,
as root: it reaches the outside through its walled pasta and nothing of the node's. Skipped,
saying why, where the runtime is not usable (no daemon, no podman, no busybox to make the test's
image from: no registry is reachable here), failed instead under FAIRGPU_REQUIRE_DOCKER=1 or
FAIRGPU_REQUIRE_PODMAN=1."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.container import Runtime, container_name, pod_name, podman_ulimits, sweep
from agents.imagelaunch import qualified
from agents.runner import Runner, RunnerConfig
from agents.sandbox import TASK_OOM_SCORE_ADJ
from agents.state import agent_tag
from tests.agents.helpers import docker_unusable, spec, wait_for
from tests.agents.test_isolation import ACME
from tests.agents.test_netns import (  # noqa: F401 - the fixtures
    OUTSIDE,
    NetNode,
    _answer,
    node,
    node_address,
    outside,
    outside_network,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
TASK = random.randrange(10_000, 1_000_000)
"""The task id: docker's container names (fairgpu-<agent>-task-<id>, fairgpu-<agent>-pod-<id>) are
the daemon's, shared by every test process on the host; the agent's tag keeps them apart too."""
RUNTIMES = ("docker", "podman")
IMAGE = "fairgpu-test/busybox:1"
"""Made from the host's busybox: the pod's pause process and the task's tools at once."""


def _docker_unusable(runtime: str = "docker") -> str:
    """Why docker (or podman) cannot run here, or ""."""
    client = shutil.which(runtime)
    if client is None:
        return f"no {runtime} client"
    try:
        info = subprocess.run([client, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"{runtime} info did not answer in 60 s"
    if info.returncode != 0:
        lines = [line.strip() for line in info.stderr.splitlines() if line.strip()]
        return f"{runtime} info failed: {lines[-1] if lines else info.returncode}"
    if shutil.which("busybox") is None:
        return "no busybox on the host to make the test's image from"
    return ""


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """The container runtime under test: every test taking a container node runs on docker and
    on podman, but for those that override it (`parametrize("runtime", ["docker"], ...)`)."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def image(runtime: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    why = _docker_unusable(runtime)
    if why:
        docker_unusable(why, runtime)
    busybox = shutil.which("busybox")
    assert busybox is not None
    archive = tmp_path_factory.mktemp("image") / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(busybox, "bin/busybox")
        for tool in ("sh", "nc", "cat", "readlink", "sleep", "timeout"):
            link = tarfile.TarInfo(f"bin/{tool}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for directory in ("tmp", "proc", "sys", "dev", "etc"):
            entry = tarfile.TarInfo(directory)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(entry)
    pause = 'CMD ["/bin/busybox", "sleep", "2147483647"]'
    # Named in full: the agent runs a podman task's image by docker's name (imagelaunch).
    named = qualified(IMAGE)
    subprocess.run(
        [runtime, "import", "--change", pause, str(archive), named], check=True, capture_output=True
    )
    return IMAGE


@pytest.fixture
def docker_node(node: NetNode, image: str, runtime: Runtime) -> Iterator[NetNode]:  # noqa: F811
    """A node whose container runtime is `runtime` (docker or podman, despite the name)."""
    node.runner = Runner(
        node.state,
        RunnerConfig(container_runtime=runtime, container_pause_image=image),
        confinement=node.confinement,
    )
    yield node
    tag = node.runner.tag
    for task_id in node.runner.records:
        for name in (container_name(tag, task_id), pod_name(tag, task_id)):
            subprocess.run([runtime, "rm", "--force", name], capture_output=True)
    node.runner.container_env.sweep(set())  # what a test that failed midway left in memory


def test_a_private_container_task_reaches_the_outside_and_nothing_of_the_node(
    docker_node: NetNode,
    image: str,
    runtime: str,
    node_address: str,  # noqa: F811
    outside: list[int],  # noqa: F811
) -> None:
    net = docker_node
    with socket.socket() as service:  # a node's service (or a host-network task) on 0.0.0.0
        service.bind(("0.0.0.0", 0))
        service.listen()
        threading.Thread(target=_answer, args=(service, b"node-service"), daemon=True).start()
        port = service.getsockname()[1]
        # nc's input stays open until the far end has closed: with its input at an end at once,
        # nc half-closes as the far end closes, and this pasta (2023_03_09) then sometimes never
        # passes the far end's FIN on, or sends its data again.
        nc = "sleep 2 | timeout 5 nc -w 3"
        script = (
            "readlink /proc/self/ns/net; cat /etc/resolv.conf; "
            f"echo out: $({nc} {OUTSIDE} {outside[1]}); "
            f"echo node: $({nc} {node_address} {port}); "
            f"echo loopback: $({nc} 127.0.0.1 {port})"
        )
        task = spec(TASK, ["sh", "-c", script], image=image, gpus=[], network="private", **ACME)
        net.runner.start(task)
        wait_for(lambda: net.namespaces.pasta_pid(TASK) is not None or net._ended(TASK), 60)
        inode = os.stat(net.namespaces.path(TASK)).st_ino
        result = net.result(TASK, timeout_s=60)
    log = result["log"]
    assert result["exit_code"] == 0, result
    assert f"net:[{inode}]" in log, log  # the task's named namespace, walled
    assert "nameserver 169.254.0.53" in log, log  # pasta's forwarded resolver
    assert "out: outside" in log, log
    lines = log.splitlines()
    assert "node:" in lines, log  # nothing answered on the node's address
    assert "loopback:" in lines, log  # its 127.0.0.1 is its own
    assert "node-service" not in log, log
    # The container, docker's pod and the namespace went with the task (podman joins the
    # namespace by path: no pod).
    for name in (container_name(net.runner.tag, TASK), pod_name(net.runner.tag, TASK)):
        assert not _exists(runtime, name), name
    assert not net.namespaces.exists(TASK)


@pytest.mark.parametrize("runtime", ["docker"], indirect=True)
def test_docker_without_a_pod_image_refuses_a_private_task_in_one_line(
    docker_node: NetNode, image: str
) -> None:
    net = docker_node
    net.runner = Runner(
        net.state, RunnerConfig(container_runtime="docker"), confinement=net.confinement
    )
    net.runner.start(spec(TASK, ["true"], image=image, gpus=[], network="private", **ACME))
    record = net.runner.records[TASK]
    assert record.state == "failed_to_start"
    assert record.reason.startswith(
        "docker runs a container in the task's own network namespace only with a pod image"
    )
    assert not net.namespaces.exists(TASK)


def _exists(runtime: str, name: str) -> bool:
    return subprocess.run([runtime, "inspect", name], capture_output=True).returncode == 0


def test_an_agent_sweeps_its_own_orphaned_containers_and_never_another_agents(
    docker_node: NetNode, image: str, runtime: Runtime, tmp_path: Path
) -> None:
    """Containers and pods outlive their agent; the agent that starts again removes those of
    its tasks that are not running, by its label and its name, and leaves another agent's on
    the same daemon alone."""
    tag, other = docker_node.runner.tag, agent_tag(tmp_path / "another-agent")
    assert tag != other
    names: list[str] = []

    def run(agent: str, task_id: int, kind: str) -> str:
        name = f"fairgpu-{agent}-{kind}-{task_id}"
        labels = ["--label", f"fairgpu.agent={agent}", "--label", f"fairgpu.task={task_id}"]
        argv = [runtime, "run", "--detach", "--rm", "--name", name, *labels, "--network=none"]
        argv += podman_ulimits() if runtime == "podman" else []
        subprocess.run([*argv, image], check=True, capture_output=True)
        names.append(name)
        return name

    try:
        orphan, orphan_pod = run(tag, TASK, "task"), run(tag, TASK, "pod")
        running = run(tag, TASK + 1, "task")
        others = run(other, TASK, "task")
        assert sorted(sweep(runtime, tag, keep={TASK + 1})) == sorted([orphan, orphan_pod])
        assert [_exists(runtime, n) for n in (orphan, orphan_pod, running, others)] == [
            False, False, True, True,
        ]  # fmt: skip
        restarted = Runner(
            docker_node.state,
            RunnerConfig(container_runtime=runtime, container_pause_image=image),
            confinement=docker_node.confinement,
        )
        restarted.recover()  # no task of its is running: none of its containers stays
        assert not _exists(runtime, running)
        assert _exists(runtime, others)
    finally:
        for name in names:
            subprocess.run([runtime, "rm", "--force", name], capture_output=True)


def test_a_container_task_goes_first_to_the_oom_killer_and_cannot_lower_itself(
    docker_node: NetNode, image: str
) -> None:
    """A container's processes are the runtime's children, not the agent's: docker gives them
    the daemon's choice unless told. Without `--oom-score-adj` this one had 0, and out of the
    node's memory the kernel's OOM killer could pick the agent or a node service first. It
    cannot go below the floor it was started with (the daemon's own value, or where the
    runtime holds CAP_SYS_RESOURCE, TASK_OOM_SCORE_ADJ itself)."""
    script = (
        "cat /proc/self/oom_score_adj; "
        "(echo -900 > /proc/self/oom_score_adj) 2>/dev/null && echo lowered || echo refused"
    )
    task = spec(TASK, ["sh", "-c", script], image=image, gpus=[], **ACME)
    docker_node.runner.start(task)
    result = docker_node.result(TASK, timeout_s=60)
    assert result["exit_code"] == 0, result
    assert result["log"].split() == [str(TASK_OOM_SCORE_ADJ), "refused"], result


def test_a_host_network_container_task_cannot_bind_the_agents_source_ports(
    docker_node: NetNode, image: str
) -> None:
    """The agent's connections to its server leave from ports below the node's
    ip_unprivileged_port_start (agents/srcport.py). docker lowers that sysctl to 0 only in a
    container's own network namespace; one in the node's network, as its org's uid with no
    capabilities, can bind none of those ports."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    ports = (start - 512, start - 300, start - 1)
    script = "cat /proc/sys/net/ipv4/ip_unprivileged_port_start; " + "; ".join(
        f"timeout 1 nc -l -p {port} 2>&1; echo {port}: $?" for port in ports
    )
    task = spec(TASK, ["sh", "-c", script], image=image, gpus=[], network="host", **ACME)
    docker_node.runner.start(task)
    result = docker_node.result(TASK, timeout_s=60)
    lines = result["log"].splitlines()
    assert lines[0] == str(start), result
    if docker_node.confinement.mode == "none":  # the agent's own user, as documented
        assert all(f"{port}: 143" in lines for port in ports), result  # bound, until timeout
        return
    for port in ports:  # busybox nc: "bind: Permission denied" and 1; bound, timeout's 143
        assert f"{port}: 1" in lines, result
    assert result["log"].count("Permission denied") == len(ports), result
