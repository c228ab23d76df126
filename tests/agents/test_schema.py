"""The agent protocol schema: limits and contract details both sides rely on."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from protocol.agent import (
    MAX_LOG_CHUNK_CHARS,
    AgentRegister,
    GpuSample,
    Heartbeat,
    HeartbeatReply,
    LogChunk,
)
from tests.agents.helpers import spec


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValidationError):
        GpuSample(index=0, uuid="GPU-1", sampled_at=dt.datetime(2026, 1, 1))
    with pytest.raises(ValidationError):
        HeartbeatReply(heartbeat_interval_s=5, server_time=dt.datetime(2026, 1, 1))


def test_limits() -> None:
    with pytest.raises(ValidationError):
        LogChunk(task_id=1, offset=0, next_offset=1, data="x" * (MAX_LOG_CHUNK_CHARS + 1))
    with pytest.raises(ValidationError):
        Heartbeat(wait_s=61)
    with pytest.raises(ValidationError):
        spec(command=[])
    with pytest.raises(ValidationError):
        spec(gpus=[64])
    with pytest.raises(ValidationError):
        AgentRegister(
            name="bad name", site="s", domain="d", hostname="h", address="a",
            agent_version="1", gpus=[],
        )  # fmt: skip


def test_unknown_fields_from_an_agent_are_an_error_not_silently_dropped() -> None:
    with pytest.raises(ValidationError):
        Heartbeat.model_validate({"samples": [], "surprise": 1})


def test_a_reply_from_a_newer_server_still_reaches_the_agent() -> None:
    """A field the agent does not know (a server upgraded before its agents) is left out: the
    agent still starts and stops the tasks it is given."""
    task = spec(3).model_dump(mode="json", exclude_none=True)
    reply = HeartbeatReply.model_validate(
        {
            "start": [{**task, "checkpoint": {"path": "/ckpt"}}],
            "stop": [{"task_id": 4, "grace_s": 5, "drain": True}],
            "heartbeat_interval_s": 5,
            "server_time": "2026-12-03T08:00:00+00:00",
            "interactive": [{"stream": 1}],
        }
    )
    assert reply.start == [spec(3)]
    assert [(s.task_id, s.grace_s) for s in reply.stop] == [(4, 5.0)]
    with pytest.raises(ValidationError):  # what it does know is still checked
        HeartbeatReply.model_validate({**reply.model_dump(mode="json"), "heartbeat_interval_s": 0})


def test_round_trip_through_json() -> None:
    reply = HeartbeatReply(
        start=[spec(3, num_nodes=2, master_addr="10.0.0.1", master_port=29500)],
        heartbeat_interval_s=5,
        server_time=dt.datetime.now(dt.UTC),
    )
    assert HeartbeatReply.model_validate_json(reply.model_dump_json()) == reply
