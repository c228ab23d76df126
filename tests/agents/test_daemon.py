"""The daemon against the real app and database (tests/harness/wire.py records the wire)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from agents.client import AgentClient
from agents.container import runtime_problem
from agents.daemon import Agent, AgentConfig, AgentError
from agents.gpu import SimulatedBackend, parse_simulate_spec
from agents.isolation import IsolationConfig
from agents.netwall import Wall
from agents.runner import RunnerConfig
from protocol.agent import HeartbeatReply, TaskSpec, TaskStop
from scheduler.db.models import Node
from scheduler.settings import Settings
from tests.agents.helpers import docker_unusable
from tests.harness.wire import Wire
from tests.scheduling.harness import Cluster, fast_settings, running_cluster

PY = sys.executable


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 30.0,  # generous: seen past 10 s at load 18
    debug: Callable[[], object] = str,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        met = predicate()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time: {debug()}")
        await asyncio.sleep(0.01)


class Harness:
    """A running cluster, an org with a user, and agents joined to it over a `Wire`."""

    def __init__(self, tmp_path: Path, cluster: Cluster, wire: Wire) -> None:
        self.tmp_path = tmp_path
        self.cluster = cluster
        self.wire = wire
        self.token = ""
        self.join = ""
        self.agents: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []

    async def setup(self) -> None:
        self.token = await self.cluster.user_token(await self.cluster.org(guaranteed=2))
        self.join = await self.cluster.join_token()

    def start(
        self,
        *,
        join_token: str | None = "",
        isolation: IsolationConfig | None = None,
        runner: RunnerConfig | None = None,
    ) -> Agent:
        """An agent with two simulated H100s; `join_token` defaults to a valid one."""
        config = AgentConfig(
            server="http://fairgpu",
            state_dir=self.tmp_path / "state",
            name="node-a",
            join_token=self.join if join_token == "" else join_token,
            address="127.0.0.1",
            poll_interval_s=0.02,
            max_backoff_s=0.2,
            isolation=isolation or IsolationConfig(),
            runner=runner or RunnerConfig(),
        )
        backend = SimulatedBackend(parse_simulate_spec("2xH100"), seed="node-a")
        client = AgentClient(config.server, transport=self.wire)
        agent = Agent(config, backend, client)
        stop = asyncio.Event()
        self.agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
        return agent

    async def stop(self, agent: Agent) -> None:
        for a, stop, task in self.agents:
            if a is agent:
                stop.set()
                await task
                await a.client.aclose()

    async def submit(self, command: list[str], **spec: Any) -> int:
        job = await self.cluster.submit(self.token, command=command, gpus_per_node=1, **spec)
        return int(job["id"])

    async def task_of(self, job_id: int) -> int:
        """The job's task id, once a reply has carried its start."""
        await until(lambda: self.wire.task_of(job_id) is not None, debug=self.wire.starts)
        task_id = self.wire.task_of(job_id)
        assert task_id is not None
        return task_id

    async def state(self, job_id: int) -> str:
        return str((await self.cluster.job(self.token, job_id))["state"])

    async def reaches(self, job_id: int, state: str, timeout_s: float = 30.0) -> None:
        async def there() -> bool:
            return await self.state(job_id) == state

        await until(there, timeout_s, debug=lambda: (self.wire.reports, self.wire.starts()))

    def reported(self, task_id: int, state: str) -> bool:
        report = self.wire.reports.get(task_id)
        return report is not None and report.state == state

    async def close(self) -> None:
        for agent, stop, task in self.agents:
            stop.set()
            with contextlib.suppress(Exception):
                await task
            await agent.client.aclose()
            for child in agent.runner._children.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()


@contextlib.asynccontextmanager
async def harnessed(tmp_path: Path, settings: Settings) -> AsyncIterator[Harness]:
    async with running_cluster(settings) as cluster:
        harness = Harness(tmp_path, cluster, Wire(cluster.app))
        await harness.setup()
        try:
            yield harness
        finally:
            await harness.close()


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harnessed(tmp_path, fast_settings(database_url)) as h:
        yield h


async def test_register_run_and_report_a_task(harness: Harness) -> None:
    wire = harness.wire
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    [registration] = wire.registrations
    assert [g.model for g in registration.gpus] == ["H100", "H100"]
    assert registration.address == "127.0.0.1"
    credential_file = harness.tmp_path / "state" / "credential.json"
    assert credential_file.stat().st_mode & 0o777 == 0o600

    job_id = await harness.submit(["sh", "-c", "echo hello; echo world >&2"])
    task_id = await harness.task_of(job_id)
    await until(
        lambda: task_id in wire.log_complete,
        debug=lambda: (wire.reports, agent.runner.records, agent.logs.in_flight),
    )
    report = wire.reports[task_id]
    assert (report.state, report.exit_code) == ("exited", 0)
    await harness.reaches(job_id, "COMPLETED")
    logs = await harness.cluster.call("GET", f"/v1/jobs/{job_id}/logs", harness.token)
    assert (sorted(logs["data"].split()), logs["eof"]) == (["hello", "world"], True)
    assert wire.heartbeats[-1].samples[0].index == 0
    # acknowledged final reports are not sent again
    sent = len(wire.heartbeats)
    await until(lambda: len(wire.heartbeats) > sent and not wire.heartbeats[-1].tasks)
    followed = await _followed_wall(agent)
    await harness.stop(agent)
    await _gone(*followed)


async def _followed_wall(agent: Agent) -> tuple[Wall, int]:
    """The agent's wall and the pid of its `nft monitor`, once it runs (as root an agent
    walls its private tasks' networks: agents/netwall.py)."""
    watch = agent.runner.confinement.wall
    assert watch is not None, agent.runner.confinement.no_namespaces
    await until(lambda: watch.monitor is not None and watch.monitor.pid is not None)
    assert watch.monitor is not None
    pid = watch.monitor.pid
    assert pid is not None
    return watch.namespaces.wall, pid


async def _gone(wall: Wall, monitor: int) -> None:
    """Neither the stopped agent's table nor its monitor is there, nor comes back (a check
    still running after the stop would make the table anew within milliseconds)."""
    await asyncio.sleep(0.5)
    assert not wall.exists(), f"table inet {wall.table} left behind"
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(monitor).status() == psutil.STATUS_ZOMBIE, "nft monitor left running"


@pytest.mark.skipif(os.geteuid() != 0, reason="the wall needs root")
async def test_a_stopped_agent_leaves_neither_its_wall_nor_its_monitor(harness: Harness) -> None:
    """Stopping waits for the clean-up even while the thread pool it runs in is busy: a
    `to_thread` that no worker had started is dropped when the task awaiting it is cancelled,
    and the wall's watch, never told to stop, then made anew the table the agent removed, its
    `nft monitor` running on in the process."""
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    followed = await _followed_wall(agent)
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, time.sleep, 0.3) for _ in range(64)]
    await harness.stop(agent)
    await asyncio.gather(*busy)
    await _gone(*followed)


async def test_a_start_arrives_through_the_long_poll_at_once(
    database_url: str, tmp_path: Path
) -> None:
    # A timer tick (every 120 s) would be far too late: the start must come with the held poll.
    # The bound below is a third of that tick, so that it tells the two paths apart on a loaded
    # machine (5.5 s seen at load 19) without measuring speed.
    settings = fast_settings(database_url, heartbeat_interval_s=120.0, heartbeat_long_poll_s=120.0)
    async with harnessed(tmp_path, settings) as harness:
        agent = harness.start()
        await asyncio.wait_for(agent.connected.wait(), 30)
        await asyncio.sleep(0.2)  # the agent is now held in a long-poll
        submitted = time.monotonic()
        job_id = await harness.submit([PY, "-c", "import time; time.sleep(30)"])
        task_id = await harness.task_of(job_id)
        await until(
            lambda: (
                task_id in agent.runner.records and agent.runner.records[task_id].pid is not None
            ),
            timeout_s=60.0,
        )
        assert time.monotonic() - submitted < 40.0  # a third of the heartbeat interval
        await until(lambda: harness.reported(task_id, "running"))
        await harness.cluster.call("POST", f"/v1/jobs/{job_id}/cancel", harness.token)
        await until(lambda: harness.reported(task_id, "stopped"))
        assert harness.wire.reports[task_id].signal == signal.SIGTERM
        await harness.reaches(job_id, "CANCELLED")


async def test_tasks_outlive_a_server_outage_and_are_reported_after(
    harness: Harness, tmp_path: Path
) -> None:
    wire = harness.wire
    go = tmp_path / "go"
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    code = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)"
    job_id = await harness.submit([PY, "-c", code, "--", "finished"])
    task_id = await harness.task_of(job_id)
    await harness.reaches(job_id, "RUNNING")
    wire.down = True  # the held request ends within a heartbeat; the next ones fail to connect
    await until(lambda: not agent.connected.is_set())
    go.touch()
    await until(lambda: agent.runner.records[task_id].state == "exited")
    await asyncio.sleep(0.3)
    assert await harness.state(job_id) == "RUNNING"  # the server has not heard yet
    wire.down = False
    # The wire records a report when the reply comes back, which a held poll may delay past
    # the job's completion in the database: wait for the report itself.
    await until(lambda: harness.reported(task_id, "exited"))
    assert wire.reports[task_id].exit_code == 0
    await harness.reaches(job_id, "COMPLETED")


async def test_restarted_agent_finds_its_task_and_never_starts_it_twice(
    harness: Harness, tmp_path: Path
) -> None:
    wire = harness.wire
    seen: dict[int, TaskSpec] = {}

    def replay(reply: HeartbeatReply) -> HeartbeatReply:
        seen.update({spec.task_id: spec for spec in reply.start})
        return reply.model_copy(update={"start": list(seen.values())})

    wire.alter = replay  # the harshest server: it keeps asking
    go, starts = tmp_path / "go", tmp_path / "starts"
    code = (
        f"import pathlib, time\nopen({str(starts)!r}, 'a').write('x')\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)"
    )
    first = harness.start()
    job_id = await harness.submit([PY, "-c", code])
    task_id = await harness.task_of(job_id)
    await until(lambda: harness.reported(task_id, "running"))
    await harness.stop(first)
    second = harness.start()
    await asyncio.wait_for(second.connected.wait(), 30)
    assert second.runner.records[task_id].state == "running"
    assert len(wire.registrations) == 1  # the stored credential was used
    go.touch()
    first.runner._children[task_id].wait()  # reap as init would for a real restarted agent
    await until(lambda: harness.reported(task_id, "exited"))  # on the wire once its reply is
    await harness.reaches(job_id, "COMPLETED")
    assert starts.read_text() == "x"


async def test_without_credential_or_join_token_the_agent_says_what_to_do(
    harness: Harness,
) -> None:
    agent = harness.start(join_token=None)
    with pytest.raises(AgentError, match="--join-token"):
        await harness.agents[0][2]
    await agent.client.aclose()
    harness.agents.clear()
    assert not harness.wire.registrations


async def test_a_bad_join_token_is_an_error(harness: Harness) -> None:
    agent = harness.start(join_token="wrong")
    with pytest.raises(AgentError, match="join token"):
        await harness.agents[0][2]
    await agent.client.aclose()
    harness.agents.clear()
    assert not harness.wire.registrations


async def test_time_limit_is_reported_as_timeout(harness: Harness) -> None:
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    job_id = await harness.submit([PY, "-c", "import time; time.sleep(30)"], time_limit=1)
    task_id = await harness.task_of(job_id)
    await until(lambda: harness.reported(task_id, "timeout"))
    report = harness.wire.reports[task_id]
    assert report.signal == signal.SIGTERM
    assert "time limit" in report.reason
    await harness.reaches(job_id, "TIMEOUT")


async def test_a_task_started_and_stopped_in_one_reply_never_runs_and_nothing_spins(
    harness: Harness,
) -> None:
    wire = harness.wire

    def stop_every_start(reply: HeartbeatReply) -> HeartbeatReply:
        stops = [*reply.stop, *(TaskStop(task_id=spec.task_id) for spec in reply.start)]
        return reply.model_copy(update={"stop": stops})

    wire.alter = stop_every_start  # and the server keeps sending the start, never reported
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    job_id = await harness.submit(["true"])
    task_id = await harness.task_of(job_id)
    before = len(wire.heartbeats)
    await asyncio.sleep(0.5)
    assert task_id not in agent.runner.records
    assert task_id not in wire.reports
    assert len(wire.heartbeats) - before <= 2  # one reply per heartbeat interval, not a flood
    assert await harness.state(job_id) == "STARTING"


async def test_registration_waits_for_the_server_to_come_up(harness: Harness) -> None:
    harness.wire.down = True
    agent = harness.start()
    await asyncio.sleep(0.4)
    assert not harness.wire.registrations
    harness.wire.down = False
    await asyncio.wait_for(agent.connected.wait(), 30)
    assert len(harness.wire.registrations) == 1


async def test_a_revoked_credential_stops_the_agent_without_registering_again(
    harness: Harness,
) -> None:
    """A join token only ever creates new nodes: it never takes a node back after a revocation."""
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    assert agent.credential is not None
    cluster = harness.cluster
    await cluster.call("POST", f"/v1/nodes/{agent.credential.node_id}/revoke", cluster.admin)
    [(_agent, _stop, task)] = harness.agents
    with pytest.raises(AgentError, match="refused this node's credential"):
        await asyncio.wait_for(task, 30)
    assert len(harness.wire.registrations) == 1
    assert not (harness.tmp_path / "state" / "credential.json").exists()


async def test_the_join_token_leaves_the_environment_once_registered(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRGPU_JOIN_TOKEN", harness.join)
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 30)
    assert "FAIRGPU_JOIN_TOKEN" not in os.environ
    assert agent._join_token is None


async def test_the_server_hears_when_the_container_runtime_comes_and_goes(
    harness: Harness, tmp_path: Path
) -> None:
    """The agent asks its runtime again now and then: one that answers only after the agent
    started (here: docker's client put in place then) gives "container" at once, one that stops
    answering takes it away, so the scheduler places image jobs by what the node can now do."""
    docker = shutil.which("docker")
    if docker is None:
        docker_unusable("no docker client")
    problem = runtime_problem("docker", docker)
    if problem is not None:
        docker_unusable(problem)
    binary = tmp_path / "bin" / "docker"
    binary.parent.mkdir()
    runner = RunnerConfig(
        container_runtime="docker", container_binary=str(binary), container_check_interval_s=0.1
    )
    agent = harness.start(runner=runner)
    await asyncio.wait_for(agent.connected.wait(), 10)

    async def reported() -> list[str]:
        async with harness.cluster.sessionmaker() as session:
            found = await session.scalar(select(Node.capabilities).where(Node.name == "node-a"))
        assert found is not None  # registered: the agent said what it can do
        return found

    async def says_container() -> bool:
        return "container" in await reported()

    async def lacks_container() -> bool:
        return "container" not in await reported()

    assert await lacks_container()
    binary.symlink_to(docker)
    await until(says_container, 30)
    binary.unlink()
    await until(lacks_container, 30)
