"""The periodic check of the private tasks' nftables wall (agents/wallwatch.py), as root, with
real tables, namespaces, pastas and tasks; the agent's report of it against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from agents.isolation import IsolationConfig
from agents.metrics import AgentMetrics
from agents.netopen import remove_all
from agents.nftmonitor import NftMonitor
from agents.runner import RunnerConfig
from agents.wallwatch import WallWatch
from scheduler.bench.procs import fairgpu_command
from scheduler.db.models import Node
from tests.agents.helpers import spec, wait_for
from tests.agents.test_daemon import Harness, harness, until  # noqa: F401 - the fixture
from tests.agents.test_isolation import ACME, PY, RIVAL
from tests.agents.test_netns import NetNode, _answer, node_address  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="nftables and namespaces need root")

# Connects to HOST:PORT every 0.1 s and prints what answered (or "walled") each time it changes.
KNOCKER = """
import socket, sys, time
host, port, last = sys.argv[1], int(sys.argv[2]), None
while True:
    try:
        with socket.create_connection((host, port), timeout=2) as c:
            now = c.recv(100).decode()
    except OSError:
        now = "walled"  # a reset, or a time-out where pasta drops the connection it lost
    if now != last:
        print(now, flush=True)
        last = now
    time.sleep(0.1)
"""


def _watch(net: NetNode) -> WallWatch:
    watch = net.confinement.wall
    assert watch is not None
    return watch


def _lines(net: NetNode, task_id: int) -> list[str]:
    return net.state.read_log(net.runner.records[task_id]).decode().split()


def _knock(net: NetNode, address: str) -> socket.socket:
    """Task 1, private: knocks at a listener of the node's, on `address`, until the test ends;
    the wall refuses it from the start."""
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    threading.Thread(target=_answer, args=(listener, b"node-service"), daemon=True).start()
    port = str(listener.getsockname()[1])
    net.runner.start(spec(1, [PY, "-c", KNOCKER, address, port], network="private", **ACME))
    wait_for(lambda: _lines(net, 1)[:1] == ["walled"], 30)
    return listener


def test_a_removed_wall_comes_back_under_a_running_private_task(
    net: NetNode,
    node_address: str,  # noqa: F811
) -> None:
    watch = _watch(net)
    with _knock(net, node_address):
        _wall_comes_back(net, watch)


def _wall_comes_back(net: NetNode, watch: WallWatch) -> None:
    assert not watch.check()
    assert watch.restores == 0
    net.namespaces.wall.remove()  # what `nft flush ruleset` does to it
    # Unwalled: the task reaches what listens on the node's address (the hole the check closes).
    wait_for(lambda: "node-service" in _lines(net, 1), 30)
    assert not watch.check()  # made anew; the node could run private tasks all along
    assert (watch.restores, watch.failures, watch.intact) == (1, 0, True)
    assert net.namespaces.wall.walled() == {1}
    assert net.namespaces.wall.differences(net.namespaces.walled_pastas()) == []
    wait_for(lambda: _lines(net, 1)[-1] == "walled", 30)
    assert _lines(net, 1) == ["walled", "node-service", "walled"]


@pytest.fixture(params=["strict", "none"])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetNode]:
    """A node's runner with walled namespaces, strict or unconfined."""
    node = NetNode(tmp_path, request.param)
    yield node
    node.close()


@pytest.mark.parametrize(
    ("change", "seen"),
    [
        ("flush chain inet {table} wall", "chain wall was changed"),
        ("insert rule inet {table} pastas accept", "chain pastas was changed"),
        ("delete chain inet {table} input", "chain input is gone"),
        ("add chain inet {table} extra", "chain extra was added"),
        ("flush chain inet {table} output", "chain output was changed"),
        (
            "add chain inet {table} output "
            "{{ type filter hook output priority filter; policy drop; }}",
            "chain output was changed",
        ),
    ],
)
def test_any_change_to_the_wall_is_seen_and_undone(tmp_path: Path, change: str, seen: str) -> None:
    net = NetNode(tmp_path, "none")
    try:
        net.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
        wait_for(lambda: net.namespaces.pasta_pid(1) is not None)
        wall, watch = net.namespaces.wall, _watch(net)
        pastas = net.namespaces.walled_pastas()
        assert list(pastas) == [1]
        if "input" in change:  # the input chain's rule first, or the chain is in use
            subprocess.run(["nft", "flush", "chain", "inet", wall.table, "input"], check=True)
        subprocess.run(["nft", *change.format(table=wall.table).split()], check=True)
        assert seen in wall.differences(pastas)
        assert not watch.check()
        assert watch.restores == 1
        assert wall.differences(pastas) == []
        assert wall.walled() == {1}
    finally:
        net.close()


def test_a_wall_that_cannot_be_made_stops_the_pastas_and_the_private_tasks(
    net: NetNode, tmp_path: Path
) -> None:
    watch = _watch(net)
    net.runner.start(spec(1, ["sleep", "60"], network="private", **ACME))
    wait_for(lambda: net.namespaces.pasta_pid(1) is not None)
    pasta = net.namespaces.pasta_pid(1)
    assert pasta is not None
    nft = net.namespaces.wall.nft
    net.namespaces.wall.remove()
    net.namespaces.wall.nft = str(tmp_path / "nft-uninstalled")  # the nftables package went
    assert watch.check()  # the node can no longer run private tasks
    assert (watch.intact, watch.failures, watch.restores) == (False, 1, 0)
    wait_for(lambda: psutil.Process(pasta).status() == psutil.STATUS_STOPPED)
    net.runner.start(spec(2, ["true"], network="private", **RIVAL))
    record = net.runner.records[2]
    assert record.state == "failed_to_start"
    assert record.reason is not None
    assert "its nftables wall was removed and cannot be made anew" in record.reason
    assert not watch.check()  # still lost: nothing changed
    assert watch.failures == 2
    net.namespaces.wall.nft = nft
    assert watch.check()  # back
    assert (watch.intact, watch.restores) == (True, 1)
    assert net.namespaces.wall.walled() == {1}
    wait_for(lambda: psutil.Process(pasta).status() != psutil.STATUS_STOPPED)
    metrics = AgentMetrics("node-a", [])
    metrics.wall = watch
    found = {
        sample.name: sample.value
        for family in metrics.collect()
        for sample in family.samples
        if sample.name.startswith("fairgpu_agent_wall")
    }
    assert found == {
        "fairgpu_agent_wall_restores_total": 1.0,
        "fairgpu_agent_wall_failures_total": 2.0,
        "fairgpu_agent_wall_intact": 1.0,
    }


async def test_the_server_hears_when_the_node_loses_and_regains_its_wall(
    harness: Harness,  # noqa: F811
) -> None:
    agent = harness.start(isolation=IsolationConfig(wall_check_interval_s=0.1))
    await asyncio.wait_for(agent.connected.wait(), 10)
    watch = agent.runner.confinement.wall
    assert watch is not None

    async def capabilities() -> list[str]:
        async with harness.cluster.sessionmaker() as session:
            found = await session.scalar(select(Node.capabilities).where(Node.name == "node-a"))
        return list(found or [])

    async def netns(expected: bool) -> None:
        async def there() -> bool:
            return ("netns" in await capabilities()) is expected

        await until(there, 30, debug=lambda: (watch.intact, agent.capabilities()))

    await netns(True)
    wall = watch.namespaces.wall
    nft = wall.nft
    wall.nft = str(harness.tmp_path / "nft-uninstalled")  # the nftables package went
    deleted = await asyncio.create_subprocess_exec(nft, "delete", "table", "inet", wall.table)
    assert await deleted.wait() == 0
    await netns(False)
    wall.nft = nft
    await netns(True)
    assert watch.failures >= 1
    assert watch.restores == 1


def _remove_and_time_restore(net: NetNode, watch: WallWatch) -> float:
    """Seconds from the wall's removal to its being made anew by the followed watch."""
    restores = watch.restores
    start = time.monotonic()
    subprocess.run(["nft", "delete", "table", "inet", net.namespaces.wall.table], check=True)
    while watch.restores == restores:
        assert time.monotonic() - start < 30, "the wall was not made anew"
        time.sleep(0.001)
    return time.monotonic() - start


def _listening(monitor: NftMonitor) -> None:
    """Until the monitor has joined the kernel's event group: it prints a change of anyone's."""
    probe = f"fairgpu-probe-{os.getpid()}"
    seen = monitor.lines
    while monitor.lines == seen:
        subprocess.run(["nft", "add", "table", "inet", probe], check=True)
        subprocess.run(["nft", "delete", "table", "inet", probe], check=True)
        time.sleep(0.05)


def test_a_followed_wall_is_back_at_once_and_after_its_monitor_died(
    net: NetNode,
    node_address: str,  # noqa: F811
) -> None:
    """Followed through `nft monitor`, a removed wall is made anew within a fraction of the
    periodic check's interval (a minute here: no periodic check runs during the test), and
    again once the killed monitor was started anew; the task is walled out of the node's
    listener after each."""
    watch = _watch(net)
    with _knock(net, node_address):
        changes: list[int] = []
        watch.follow(60.0, lambda: changes.append(1))
        try:
            monitor = watch.monitor
            assert monitor is not None
            wait_for(lambda: monitor.pid is not None)
            _listening(monitor)
            first = _remove_and_time_restore(net, watch)
            assert first < 5.0, first
            killed = monitor.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            wait_for(lambda: monitor.starts == 2 and monitor.pid not in (None, killed), 30)
            _listening(monitor)
            second = _remove_and_time_restore(net, watch)
            assert second < 5.0, second
            restarted = monitor.pid
        finally:
            watch.unfollow()
        print(f"wall back in {first * 1000:.0f} ms, after a monitor restart {second * 1000:.0f} ms")
        assert (watch.restores, watch.failures, watch.intact) == (2, 0, True)
        assert changes == []  # the node could run private tasks all along
        assert net.namespaces.wall.differences(net.namespaces.walled_pastas()) == []
        wait_for(lambda: _lines(net, 1)[-1] == "walled", 30)
        assert monitor.pid is None  # unfollowed: no monitor left running
        # This watch's monitors only: another test's agent in this worker may still be
        # stopping its own.
        assert not [c for c in psutil.Process().children() if c.pid in (killed, restarted)]


@pytest.mark.parametrize(
    ("runner", "container", "private"),
    [
        (RunnerConfig(container_runtime="docker"), True, False),  # no pod image
        (RunnerConfig(container_runtime="docker", container_pause_image="pause:1"), True, True),
        # A runtime that does not answer (here: not installed) runs no container at all.
        (
            RunnerConfig(container_runtime="podman", container_binary="/nonexistent/podman"),
            False,
            False,
        ),  # fmt: skip
        (RunnerConfig(), False, False),  # no container runtime
        # docker answers, but every container starts through the helper, which is not there.
        (
            RunnerConfig(
                container_runtime="docker",
                container_pause_image="pause:1",
                exec_helper=Path("/nonexistent/fairgpu-exec"),
            ),
            False,
            False,
        ),
    ],
)
async def test_the_server_hears_whether_the_node_runs_containers_and_in_private_networks(
    harness: Harness,  # noqa: F811
    runner: RunnerConfig,
    container: bool,
    private: bool,
) -> None:
    """ "container" where the node's runtime answers (the scheduler places a job with an image
    by it), and "container-netns" beside it and "netns" only where that runtime can put a
    container in the task's namespace (a private job with an image)."""
    agent = harness.start(runner=runner)
    await asyncio.wait_for(agent.connected.wait(), 10)

    async def reported() -> bool:
        async with harness.cluster.sessionmaker() as session:
            found = await session.scalar(select(Node.capabilities).where(Node.name == "node-a"))
        return found is not None and "netns" in found

    await until(reported, 30)
    async with harness.cluster.sessionmaker() as session:
        found = await session.scalar(select(Node.capabilities).where(Node.name == "node-a"))
    assert found is not None
    assert ("container" in found) is container
    assert ("container-netns" in found) is private


def test_an_agent_killed_with_sigkill_leaves_no_nft_monitor_behind(tmp_path: Path) -> None:
    """A real `fairgpu agent` process follows its wall through `nft monitor`; SIGKILLed (no
    `stop` runs), its monitor gets the parent-death signal and is gone within a second or two,
    rather than living on until the next ruleset event broke its pipe."""
    state = tmp_path / "state"
    cgroup_parent = f"fairgpu-nw-{uuid.uuid4().hex[:8]}"
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [
            *fairgpu_command(), "agent", "--server", "http://127.0.0.1:9", "--join-token", "t",
            "--simulate", "1xH100", "--state-dir", str(state), "--isolation", "none",
            "--cgroup-parent", cgroup_parent, "--log-level", "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def monitors() -> list[psutil.Process]:
            """The agent's `nft monitor` (not the one-off `nft` its wall checks run)."""
            found = []
            for child in psutil.Process(agent.pid).children():
                with contextlib.suppress(psutil.Error):
                    if child.name() == "nft" and child.cmdline()[1:] == ["monitor"]:
                        found.append(child)
            return found

        wait_for(lambda: len(monitors()) == 1 or agent.poll() is not None, 60)
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        (monitor,) = monitors()
        agent.kill()
        agent.wait(10)
        gone_by = time.monotonic() + 2.0
        while monitor.is_running() and monitor.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < gone_by, "the killed agent's nft monitor lives on"
            time.sleep(0.02)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        log.close()
        remove_all(state, cgroup_parent)
        for group in Path("/sys/fs/cgroup").glob(f"{cgroup_parent}*"):
            group.rmdir()
