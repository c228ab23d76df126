"""`GET /v1/jobs` carries what a queue view shows (names, nodes, first reason) in a constant
number of queries, filters by submit and end time, and `org` on submit is authorised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from protocol.states import JobState
from scheduler.db import Job, Task
from tests import factories
from tests.api.helpers import World

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@contextmanager
def counting_queries(engine: AsyncEngine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def _set(world: World, job_id: int, **values: Any) -> None:
    async with world.app.state.sessionmaker() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        for key, value in values.items():
            setattr(job, key, value)
        await session.commit()


async def test_listing_carries_names_nodes_and_first_reason(world: World) -> None:
    waiting = await world.job("member_a", name="waits")
    held = await world.job("member_a2", name="held", held=True)
    fresh = await world.job("member_a", name="fresh")
    running = await world.job("member_a", name="runs", state=JobState.RUNNING, num_nodes=2)
    eta = T0 + timedelta(hours=2)
    reasons = [
        {"code": "QuotaGuaranteed", "message": "x" * 500, "details": {"headroom": 0}},
        {"code": "Priority", "message": "behind job 3", "details": {}},
    ]
    await _set(world, waiting.id, pending_reasons=reasons, estimated_start_at=eta)
    async with world.app.state.sessionmaker() as session:
        assert world.node is not None
        other, _ = await factories.node(session, gpus=2)
        # Rank 1 stored first: the listing orders by rank, not by insertion. An earlier
        # attempt on a third node is not where the job runs now.
        gone, _ = await factories.node(session, gpus=1)
        session.add_all(
            [
                Task(job_id=running.id, attempt=0, node_rank=0, node_id=gone.id),
                Task(job_id=running.id, attempt=1, node_rank=1, node_id=other.id),
                Task(job_id=running.id, attempt=1, node_rank=0, node_id=world.node.id),
            ]
        )
        await session.commit()
        names = [world.node.name, other.name]
    async with world.client("member_a") as c:
        body = (await c.get("/v1/jobs")).json()
        one = (await c.get(f"/v1/jobs/{waiting.id}")).json()
    jobs = {j["id"]: j for j in body["data"]}
    assert {j["org_name"] for j in jobs.values()} == {"org-a"}
    assert jobs[held.id]["user_name"] == "member-a2"
    assert jobs[waiting.id]["user_name"] == "member-a"
    first = jobs[waiting.id]["pending_reason"]
    assert first["code"] == "QuotaGuaranteed"
    assert 0 < len(first["message"]) <= 200
    assert datetime.fromisoformat(jobs[waiting.id]["estimated_start_at"]) == eta
    assert jobs[held.id]["pending_reason"]["code"] == "JobHeldUser"
    assert jobs[fresh.id]["pending_reason"] is None
    assert jobs[running.id]["pending_reason"] is None
    assert jobs[running.id]["node_names"] == names
    assert jobs[waiting.id]["node_names"] == []
    assert one["pending_reason"] == first
    assert one["org_name"] == "org-a"


async def test_a_page_costs_the_same_queries_for_1_or_40_jobs(world: World) -> None:
    engine: AsyncEngine = world.app.state.engine

    async def page_queries() -> int:
        async with world.client("admin_a") as c:
            with counting_queries(engine) as statements:
                reply = await c.get("/v1/jobs", params={"limit": 500})
            assert reply.status_code == 200
        return len(statements)

    job = await world.job("member_a", state=JobState.RUNNING)
    async with world.app.state.sessionmaker() as session:
        assert world.node is not None
        row = await session.get(Job, job.id)
        assert row is not None
        await factories.running_task(session, row, world.node, [])
        await session.commit()
    await page_queries()  # the token's first lookup and its bookkeeping are not the page's
    small = await page_queries()
    assert small <= 4
    for i in range(39):
        await world.job("member_a2" if i % 2 else "member_a", state=JobState.RUNNING)
    assert await page_queries() == small


async def test_members_see_only_their_org(world: World) -> None:
    mine = await world.job("member_a")
    theirs = await world.job("member_b")
    async with world.client("member_b") as c:
        seen = (await c.get("/v1/jobs")).json()["data"]
        other_org = await c.get("/v1/jobs", params={"org": "org-a"})
        by_name = (await c.get("/v1/jobs", params={"user": "member-a"})).json()["data"]
    assert [(j["id"], j["org_name"]) for j in seen] == [(theirs.id, "org-b")]
    assert other_org.status_code == 404
    assert by_name == []
    async with world.client("platform") as c:
        every = (await c.get("/v1/jobs")).json()["data"]
    assert {(j["id"], j["org_name"]) for j in every} == {(mine.id, "org-a"), (theirs.id, "org-b")}


async def test_time_window_on_submit_and_end(world: World) -> None:
    old = await world.job("member_a", submitted_at=T0 - timedelta(days=10))
    done = await world.job(
        "member_a",
        state=JobState.COMPLETED,
        submitted_at=T0 - timedelta(days=3),
        ended_at=T0 - timedelta(days=1),
    )
    recent = await world.job("member_a", submitted_at=T0)

    async def ids(**params: str) -> list[int]:
        async with world.client("member_a") as c:
            reply = await c.get("/v1/jobs", params=params)
        assert reply.status_code == 200, reply.text
        return [j["id"] for j in reply.json()["data"]]

    since = (T0 - timedelta(days=5)).isoformat()
    assert await ids(submitted_since=since) == [recent.id, done.id]
    assert await ids(submitted_until=since) == [old.id]
    assert await ids(submitted_since=since, submitted_until=T0.isoformat()) == [done.id]
    assert await ids(ended_since=(T0 - timedelta(days=2)).isoformat()) == [done.id]
    assert await ids(ended_since=T0.isoformat()) == []
    assert await ids(ended_until=T0.isoformat()) == [done.id]
    zulu = (T0 - timedelta(days=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert await ids(submitted_since=zulu) == [recent.id, done.id]
    async with world.client("member_a") as c:
        naive = await c.get("/v1/jobs", params={"ended_since": "2026-01-01T00:00:00"})
        garbage = await c.get("/v1/jobs", params={"ended_since": "7d"})
    assert naive.status_code == 422
    assert "timezone" in naive.json()["detail"]
    assert garbage.status_code == 422


SUBMIT = {"command": ["true"], "gpus_per_node": 1, "time_limit": 60}


async def test_submit_on_behalf_of_an_org(world: World) -> None:
    async def submit(who: str, org: str) -> tuple[int, dict[str, Any]]:
        async with world.client(who) as c:
            reply = await c.post("/v1/jobs", json={**SUBMIT, "org": org})
        return reply.status_code, reply.json()

    status, job = await submit("platform", "org-b")
    assert (status, job["org_id"]) == (201, world.org_b.id)
    status, job = await submit("platform", str(world.org_a.id))
    assert (status, job["org_id"]) == (201, world.org_a.id)
    status, job = await submit("member_a", "org-a")
    assert (status, job["org_id"]) == (201, world.org_a.id)
    status, job = await submit("admin_a", str(world.org_a.id))
    assert (status, job["org_id"]) == (201, world.org_a.id)
    for who, org in [("admin_a", "org-b"), ("member_a", "org-b"), ("member_a", "no-such-org")]:
        status, problem = await submit(who, org)
        assert status == 403, (who, org)
        assert "own organisation" in problem["detail"]
    assert (await submit("platform", "no-such-org"))[0] == 404
    assert (await submit("platform", "99999999999999999999"))[0] == 404
    async with world.client("platform") as c:
        orgless = await c.post("/v1/jobs", json=SUBMIT)
        listed = (await c.get("/v1/jobs")).json()["data"]
    assert orgless.status_code == 422
    assert [(j["org_name"], j["user_name"]) for j in listed[-2:]] == [
        ("org-a", "root"),
        ("org-b", "root"),
    ]
    async with world.client("member_b") as c:
        seen = (await c.get("/v1/jobs")).json()["data"]
    assert [j["user_name"] for j in seen] == ["root"]
