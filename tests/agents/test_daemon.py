"""The daemon against a small real ASGI app speaking the agent protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agents.client import AgentClient
from agents.daemon import Agent, AgentConfig, AgentError
from agents.gpu import SimulatedBackend, parse_simulate_spec
from protocol.agent import TaskStop
from tests.agents.fake_server import JOIN_TOKEN, FakeServer
from tests.agents.helpers import spec

PY = sys.executable


async def until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, debug: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time: {debug()}")
        await asyncio.sleep(0.01)


class Harness:
    def __init__(self, tmp_path: Path, server: FakeServer) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.agents: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []

    def start(self, *, join_token: str | None = JOIN_TOKEN) -> Agent:
        config = AgentConfig(
            server="http://fairgpu.test",
            state_dir=self.tmp_path / "state",
            name="node-a",
            join_token=join_token,
            address="127.0.0.1",
            poll_interval_s=0.02,
            max_backoff_s=0.2,
        )
        backend = SimulatedBackend(parse_simulate_spec("2xH100"), seed="node-a")
        client = AgentClient(config.server, transport=self.server.transport())
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


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, FakeServer(heartbeat_interval_s=1.0))
    yield h
    for agent, stop, task in h.agents:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        await agent.client.aclose()
        for child in agent.runner._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


async def test_register_run_and_report_a_task(harness: Harness) -> None:
    server = harness.server
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    registration = server.registrations[0]
    assert [g.model for g in registration.gpus] == ["H100", "H100"]
    assert registration.address == "127.0.0.1"
    credential_file = harness.tmp_path / "state" / "credential.json"
    assert credential_file.stat().st_mode & 0o777 == 0o600

    server.submit(spec(1, ["sh", "-c", "echo hello; echo world >&2"], gpus=[1]))
    await until(
        lambda: 1 in server.log_complete,
        debug=lambda: (
            server.reports,
            server.logs,
            agent.runner.records,
            agent.logs.in_flight,
            [(len(h.tasks), len(h.logs), h.wait_s) for h in server.heartbeats],
        ),
    )
    report = server.reports[1]
    assert (report.state, report.exit_code) == ("exited", 0)
    assert sorted(server.logs[1].split()) == ["hello", "world"]
    assert server.heartbeats[-1].samples[0].index == 0
    # acknowledged final reports are not sent again
    await until(lambda: len(server.heartbeats) >= 2 and not server.heartbeats[-1].tasks)


async def test_a_start_arrives_through_the_long_poll_at_once(harness: Harness) -> None:
    server = FakeServer(heartbeat_interval_s=30.0)  # a timer tick would be far too late
    harness.server = server
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    await asyncio.sleep(0.2)  # the agent is now held in a long-poll
    submitted = time.monotonic()
    server.submit(spec(1, [PY, "-c", "import time; time.sleep(30)"]))
    await until(lambda: 1 in agent.runner.records and agent.runner.records[1].pid is not None)
    assert time.monotonic() - submitted < 0.5
    await until(lambda: 1 in server.reports and server.reports[1].state == "running")
    server.cancel(1, grace_s=0.2)
    await until(lambda: server.reports[1].state == "stopped")
    assert server.reports[1].signal == signal.SIGTERM


async def test_tasks_outlive_a_server_outage_and_are_reported_after(
    harness: Harness, tmp_path: Path
) -> None:
    server = harness.server
    go = tmp_path / "go"
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    code = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)"
    server.submit(spec(1, [PY, "-c", code, "--", "finished"]))
    await until(lambda: 1 in server.reports and server.reports[1].state == "running")
    server.down = True
    server.wake()  # let the held request go; the next ones fail to connect
    await until(lambda: not agent.connected.is_set())
    go.touch()
    await until(lambda: agent.runner.records[1].state == "exited")
    await asyncio.sleep(0.3)
    assert server.reports[1].state == "running"  # the server has not heard yet
    server.down = False
    await until(lambda: server.reports[1].state == "exited")
    assert server.reports[1].exit_code == 0


async def test_restarted_agent_finds_its_task_and_never_starts_it_twice(
    harness: Harness, tmp_path: Path
) -> None:
    server = harness.server
    server.resend_starts_forever = True  # the harshest server: it keeps asking
    go, starts = tmp_path / "go", tmp_path / "starts"
    code = (
        f"import pathlib, time\nopen({str(starts)!r}, 'a').write('x')\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)"
    )
    first = harness.start()
    server.submit(spec(1, [PY, "-c", code]))
    await until(lambda: 1 in server.reports and server.reports[1].state == "running")
    await harness.stop(first)
    second = harness.start()
    await asyncio.wait_for(second.connected.wait(), 5)
    assert second.runner.records[1].state == "running"
    assert len(server.registrations) == 1  # the stored credential was used
    go.touch()
    first.runner._children[1].wait()  # reap as init would for a real restarted agent
    await until(lambda: server.reports[1].state == "exited")
    assert starts.read_text() == "x"


async def test_without_credential_or_join_token_the_agent_says_what_to_do(
    harness: Harness,
) -> None:
    agent = harness.start(join_token=None)
    with pytest.raises(AgentError, match="--join-token"):
        await harness.agents[0][2]
    await agent.client.aclose()
    harness.agents.clear()


async def test_a_bad_join_token_is_an_error(harness: Harness) -> None:
    harness.start(join_token="wrong")
    with pytest.raises(AgentError, match="join token"):
        await harness.agents[0][2]
    harness.agents.clear()


async def test_time_limit_is_reported_as_timeout(harness: Harness) -> None:
    server = harness.server
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    server.submit(spec(1, [PY, "-c", "import time; time.sleep(30)"], time_limit_s=0.3))
    await until(lambda: 1 in server.reports and server.reports[1].state == "timeout")
    assert server.reports[1].signal == signal.SIGTERM
    assert "time limit" in server.reports[1].reason


async def test_a_task_started_and_stopped_in_one_reply_never_runs_and_nothing_spins(
    harness: Harness,
) -> None:
    server = harness.server
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    server.to_stop[1] = TaskStop(task_id=1)  # a server that keeps repeating an unknown stop
    server.submit(spec(1, ["true"]))
    before = len(server.heartbeats)
    await asyncio.sleep(0.5)
    assert 1 not in agent.runner.records
    assert 1 not in server.reports
    assert len(server.heartbeats) - before <= 2  # one reply per heartbeat interval, not a flood


async def test_registration_waits_for_the_server_to_come_up(harness: Harness) -> None:
    harness.server.down = True
    agent = harness.start()
    await asyncio.sleep(0.4)
    assert not harness.server.registrations
    harness.server.down = False
    await asyncio.wait_for(agent.connected.wait(), 5)
    assert len(harness.server.registrations) == 1


async def test_a_revoked_credential_stops_the_agent_without_registering_again(
    harness: Harness,
) -> None:
    """A join token only ever creates new nodes: it never takes a node back after a revocation."""
    server = harness.server
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    server.credentials.clear()  # revoked on the server
    server.wake()
    [(_agent, _stop, task)] = harness.agents
    with pytest.raises(AgentError, match="refused this node's credential"):
        await asyncio.wait_for(task, 5)
    assert len(server.registrations) == 1


async def test_the_join_token_leaves_the_environment_once_registered(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRGPU_JOIN_TOKEN", JOIN_TOKEN)
    agent = harness.start()
    await asyncio.wait_for(agent.connected.wait(), 5)
    assert "FAIRGPU_JOIN_TOKEN" not in os.environ
    assert agent._join_token is None
