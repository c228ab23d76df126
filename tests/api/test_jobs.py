"""Jobs through the real app: submit and its limits, idempotency, lifecycle calls, explain,
logs and events."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from protocol.states import JobState
from scheduler.db import Event, Job, LogChunk, Task
from tests.api.helpers import World

JOB: dict[str, Any] = {"command": ["python", "train.py"], "gpus_per_node": 8, "time_limit": "1h30m"}


async def count_jobs(world: World) -> int:
    async with world.app.state.sessionmaker() as s:
        return int(await s.scalar(select(func.count()).select_from(Job)) or 0)


async def test_submit_stores_pending_job_with_event_and_notifies(world: World) -> None:
    async with world.client("member_a") as c:
        r = await c.post("/v1/jobs", json={**JOB, "env": {"SEED": "1"}, "priority_class": "low"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "PENDING"
    assert job["time_limit_s"] == 5400
    assert job["org_id"] == world.org_a.id
    assert job["user_id"] == world.users["member_a"].id
    assert world.runtime.notified == ["submit"]
    async with world.app.state.sessionmaker() as s:
        events = (await s.scalars(select(Event).where(Event.job_id == job["id"]))).all()
    assert [(e.kind, e.from_state, e.to_state, e.actor) for e in events] == [
        ("job.state", None, "PENDING", "user:member-a")
    ]


async def test_time_limit_defaults_and_seconds(world: World) -> None:
    async with world.client("member_a") as c:
        by_default = await c.post("/v1/jobs", json={"command": ["true"]})
        in_seconds = await c.post("/v1/jobs", json={"command": ["true"], "time_limit": 90})
        clock = await c.post("/v1/jobs", json={"command": ["true"], "time_limit": "1-02:00:00"})
    assert by_default.json()["time_limit_s"] == 86_400
    assert in_seconds.json()["time_limit_s"] == 90
    assert clock.json()["time_limit_s"] == 26 * 3600


async def test_idempotency_key(world: World) -> None:
    async with world.client("member_a") as c:
        first = await c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "run-7"})
        again = await c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "run-7"})
        other_key = await c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "run-8"})
    async with world.client("member_a2") as c:
        other_user = await c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "run-7"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert other_key.status_code == other_user.status_code == 201
    assert len({first.json()["id"], other_key.json()["id"], other_user.json()["id"]}) == 3
    assert await count_jobs(world) == 3
    assert world.runtime.notified.count("submit") == 3


async def test_idempotency_key_under_concurrent_retries(world: World) -> None:
    async with world.client("member_a") as c:
        replies = await asyncio.gather(
            *(c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "burst"}) for _ in range(6))
        )
    assert all(r.status_code in (200, 201) for r in replies), [r.text for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum(r.status_code == 201 for r in replies) == 1
    assert await count_jobs(world) == 1


BAD_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("no command", {"time_limit": 60}),
    ("empty command", {"command": []}),
    ("empty program", {"command": [""]}),
    ("too many args", {"command": ["x"] * 257}),
    ("command too big", {"command": ["x", "y" * 70_000]}),
    ("NUL in arg", {"command": ["x", "a\x00b"]}),
    ("zero gpus", {"command": ["x"], "gpus_per_node": 0}),
    ("65 gpus", {"command": ["x"], "gpus_per_node": 65}),
    ("zero nodes", {"command": ["x"], "nodes": 0}),
    ("513 nodes", {"command": ["x"], "nodes": 513}),
    ("gpus as text", {"command": ["x"], "gpus_per_node": "eight"}),
    ("time limit 0", {"command": ["x"], "time_limit": 0}),
    ("negative time", {"command": ["x"], "time_limit": -5}),
    ("bare number string", {"command": ["x"], "time_limit": "90"}),
    ("bad duration", {"command": ["x"], "time_limit": "forever"}),
    ("over max", {"command": ["x"], "time_limit": "400d"}),
    ("fractional seconds", {"command": ["x"], "time_limit": 1.5}),
    ("bool time", {"command": ["x"], "time_limit": True}),
    ("bad env name", {"command": ["x"], "env": {"1BAD": "v"}}),
    ("env dash", {"command": ["x"], "env": {"A-B": "v"}}),
    ("reserved env", {"command": ["x"], "env": {"FAIRGPU_JOB_ID": "1"}}),
    ("cuda env", {"command": ["x"], "env": {"CUDA_VISIBLE_DEVICES": "0"}}),
    ("too many env", {"command": ["x"], "env": {f"V{i}": "x" for i in range(257)}}),
    ("env too big", {"command": ["x"], "env": {"A": "x" * 66_000}}),
    ("env not strings", {"command": ["x"], "env": {"A": 1}}),
    ("control chars in name", {"command": ["x"], "name": "a\nb"}),
    ("name too long", {"command": ["x"], "name": "n" * 129}),
    ("blank name", {"command": ["x"], "name": "   "}),
    ("unknown class", {"command": ["x"], "priority_class": "urgent"}),
    ("bad gpu type", {"command": ["x"], "gpu_type": "H100 80GB"}),
    ("bad site", {"command": ["x"], "site": "../etc"}),
    ("unknown field", {"command": ["x"], "gpus": 8}),
    ("negative dependency", {"command": ["x"], "depends_on": [-1]}),
    ("unknown dependency", {"command": ["x"], "depends_on": [987654]}),
    ("huge dependency", {"command": ["x"], "depends_on": [2**70]}),
    ("command not a list", {"command": "python train.py"}),
    ("body not an object", ["x"]),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("why", "body"), BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
async def test_bad_submissions_are_4xx_problems(world: World, why: str, body: Any) -> None:
    async with world.client("member_a") as c:
        r = await c.post("/v1/jobs", json=body)
    assert 400 <= r.status_code < 500, (why, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == r.status_code
    assert problem["detail"]
    assert problem["instance"] == "/v1/jobs"
    assert await count_jobs(world) == 0


async def test_bad_requests_elsewhere(world: World) -> None:
    async with world.client("member_a") as c:
        assert (await c.post("/v1/jobs", content=b"{not json")).status_code == 422
        r = await c.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k" * 129})
        assert r.status_code == 422
        assert (await c.get("/v1/jobs/99999999999999999999999")).status_code in (404, 422)
        assert (await c.get("/v1/jobs/-1")).status_code == 422  # not a job id (nor 42_7)
        assert (await c.get("/v1/jobs/0")).status_code == 404
        assert (await c.get("/v1/jobs/abc")).status_code == 422
        assert (await c.get("/v1/jobs?limit=0")).status_code == 422
        assert (await c.get("/v1/jobs?limit=100000")).status_code == 422
        assert (await c.get("/v1/jobs?state=SLEEPING")).status_code == 422
        assert (await c.get("/v1/jobs?cursor=abc")).status_code == 422
        assert (await c.get("/v1/usage?period=year")).status_code == 422
        assert (await c.get("/v1/usage?since=2026-01-01T00:00:00")).status_code == 422
        assert (await c.get("/v1/nope")).status_code == 404
        assert (await c.delete("/v1/jobs")).status_code == 405
        job = (await c.post("/v1/jobs", json=JOB)).json()
        assert (await c.get(f"/v1/jobs/{job['id']}/logs?offset=1&tail=1")).status_code == 422
        assert (await c.get(f"/v1/jobs/{job['id']}/logs?rank=3")).status_code == 404
        assert (await c.get(f"/v1/jobs/{job['id']}/logs?wait_s=999")).status_code == 422


async def test_dependencies(world: World) -> None:
    other_org = await world.job("member_b")
    failed = await world.job("member_a", state=JobState.FAILED)
    async with world.client("member_a") as c:
        first = (await c.post("/v1/jobs", json=JOB)).json()
        after = await c.post("/v1/jobs", json={**JOB, "depends_on": [first["id"]]})
        foreign = await c.post("/v1/jobs", json={**JOB, "depends_on": [other_org.id]})
        dead = await c.post("/v1/jobs", json={**JOB, "depends_on": [failed.id]})
        shown = (await c.get(f"/v1/jobs/{after.json()['id']}")).json()
    assert after.status_code == 201
    assert shown["depends_on"] == [first["id"]]
    assert foreign.status_code == 422
    # Another org's job reads exactly like an unknown one.
    assert str(other_org.id) in foreign.json()["detail"]
    assert "unknown" in foreign.json()["detail"]
    assert dead.status_code == 422


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(
            ["command", "gpus_per_node", "nodes", "time_limit", "env", "name", "gpu_type", "x"]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True),
            st.text(max_size=20),
            st.lists(st.text(max_size=5), max_size=3),
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        ),
    )
)
async def test_random_submissions_never_500(world: World, body: dict[str, Any]) -> None:
    # json.dumps writes NaN and Infinity, which Python's parser on the server accepts.
    raw = json.dumps(body).encode()
    async with world.client("member_a") as c:
        r = await c.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (201, 422), r.text


async def test_cancel_pending_and_running(world: World) -> None:
    pending = await world.job("member_a")
    running = await world.job("member_a", state=JobState.RUNNING)
    assert world.node is not None
    async with world.app.state.sessionmaker() as s:
        task = Task(job_id=running.id, node_rank=0, node_id=world.node.id, state=JobState.RUNNING)
        s.add(task)
        await s.commit()
    async with world.client("member_a") as c:
        r1 = await c.post(f"/v1/jobs/{pending.id}/cancel", json={"reason": "wrong flags"})
        r2 = await c.post(f"/v1/jobs/{running.id}/cancel")
        again = await c.post(f"/v1/jobs/{pending.id}/cancel")
    assert r1.json()["state"] == "CANCELLED"
    assert r1.json()["state_reason"] == "wrong flags"
    assert r2.json()["state"] == "RUNNING"  # until the agent reports the exit
    assert again.status_code == 409
    assert world.runtime.woken == [world.node.id]
    async with world.app.state.sessionmaker() as s:
        stored = await s.get(Task, task.id)
        assert stored is not None
        assert stored.stop_reason == "cancel"
        assert stored.stop_requested_at is not None
        assert stored.stop_grace_s == 30.0


async def test_hold_release(world: World) -> None:
    job = await world.job("member_a")
    async with world.client("member_a") as c:
        held = (await c.post(f"/v1/jobs/{job.id}/hold")).json()
        explained = (await c.get(f"/v1/jobs/{job.id}/explain")).json()
        released = (await c.post(f"/v1/jobs/{job.id}/release")).json()
        events = (await c.get(f"/v1/jobs/{job.id}/events")).json()["data"]
    assert held["held"] is True
    assert explained["reasons"][0]["code"] == "JobHeldUser"
    assert released["held"] is False
    assert [e["kind"] for e in events] == ["job.hold", "job.release"]
    done = await world.job("member_a", state=JobState.COMPLETED)
    async with world.client("member_a") as c:
        assert (await c.post(f"/v1/jobs/{done.id}/hold")).status_code == 409


async def test_explain_reads_what_the_cycle_wrote(world: World) -> None:
    eta = datetime.now(UTC) + timedelta(hours=2)
    job = await world.job(
        "member_a",
        priority=1234.5,
        pending_reasons=[
            {"code": "Resources", "message": "no 8-GPU gang free", "details": {"largest": 4}}
        ],
        estimated_start_at=eta,
    )
    fresh = await world.job("member_a")
    async with world.client("member_a") as c:
        seen = (await c.get(f"/v1/jobs/{job.id}/explain")).json()
        unseen = (await c.get(f"/v1/jobs/{fresh.id}/explain")).json()
    assert seen["evaluated"] is True
    assert seen["reasons"] == [
        {"code": "Resources", "message": "no 8-GPU gang free", "details": {"largest": 4}}
    ]
    assert datetime.fromisoformat(seen["estimated_start_at"]) == eta
    assert seen["priority"] == 1234.5
    assert unseen["evaluated"] is False
    assert "no scheduling cycle" in unseen["message"]


async def test_list_filters_and_cursor_pagination(world: World) -> None:
    ids = [(await world.job("member_a")).id for _ in range(5)]
    colleague = await world.job("member_a2", state=JobState.RUNNING)
    async with world.client("member_a") as c:
        pages: list[int] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, "mine": "true"}
            if cursor:
                params["cursor"] = cursor
            body = (await c.get("/v1/jobs", params=params)).json()
            pages.extend(j["id"] for j in body["data"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        running = (await c.get("/v1/jobs?state=RUNNING")).json()["data"]
        by_user = (await c.get("/v1/jobs?user=member-a2")).json()["data"]
        several = (await c.get("/v1/jobs?state=RUNNING&state=PENDING")).json()["count"]
    assert pages == sorted(ids, reverse=True)
    assert [j["id"] for j in running] == [colleague.id]
    assert [j["id"] for j in by_user] == [colleague.id]
    assert several == 6


async def test_logs_offset_tail_and_follow(world: World) -> None:
    job = await world.job("member_a", state=JobState.RUNNING, num_nodes=2)
    assert world.node is not None
    async with world.app.state.sessionmaker() as s:
        task = Task(job_id=job.id, node_rank=1, node_id=world.node.id, state=JobState.RUNNING)
        s.add(task)
        await s.flush()
        s.add_all(
            [
                LogChunk(task_id=task.id, offset=0, data="hello\n"),
                LogChunk(task_id=task.id, offset=6, data="world\n"),
            ]
        )
        task.log_bytes = 12
        await s.commit()
    base = f"/v1/jobs/{job.id}/logs?rank=1"
    async with world.client("member_a") as c:
        whole = (await c.get(base)).json()
        middle = (await c.get(base + "&offset=3")).json()
        tail = (await c.get(base + "&tail=6")).json()
        rank0 = (await c.get(f"/v1/jobs/{job.id}/logs")).json()
        empty = (await c.get(base + f"&offset={whole['next_offset']}")).json()

        async def later() -> None:
            await asyncio.sleep(0.3)
            async with world.app.state.sessionmaker() as s:
                s.add(LogChunk(task_id=task.id, offset=12, data="more\n"))
                stored = await s.get(Task, task.id)
                assert stored is not None
                stored.log_bytes = 17
                await s.commit()

        writer = asyncio.create_task(later())
        followed = (await c.get(base + f"&offset={whole['next_offset']}&wait_s=5")).json()
        await writer
    assert whole["data"] == "hello\nworld\n"
    assert whole["next_offset"] == 12
    assert middle["data"] == "lo\nworld\n"
    assert tail["data"] == "world\n"
    assert rank0["data"] == ""
    assert rank0["task_id"] is None
    assert empty["data"] == ""
    assert empty["next_offset"] == 12
    assert empty["eof"] is False
    assert followed["data"] == "more\n"
    assert followed["next_offset"] == 17
