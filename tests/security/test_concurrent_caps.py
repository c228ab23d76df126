"""Caps that a burst of concurrent requests must not overshoot: enabled users and users kept
(disabled ones included) per org, live tokens per user and stored events per job and kind.
Each burst is N requests at once from N clients over HTTP to the real app, on SQLite and
PostgreSQL; the count never passes the cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from scheduler.db import ApiToken, Event, Job, User
from tests.api.helpers import World, running_app, seed_world

BURST = 12
CAP = 6


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(
        database_url,
        max_users_per_org=CAP,
        max_tokens_per_user=CAP,
        max_job_events_per_kind=CAP,
        change_burst=1000,
    ) as app:
        yield await seed_world(app)


async def _burst(
    world: World, who: str, method: str, paths: list[str], bodies: list[Any]
) -> list[int]:
    """Every request at once, each from a client of its own."""
    clients = [world.client(who) for _ in paths]
    try:
        responses = await asyncio.gather(
            *(
                c.request(method, path, json=body)
                for c, path, body in zip(clients, paths, bodies, strict=True)
            )
        )
    finally:
        for c in clients:
            await c.aclose()
    for r in responses:
        assert r.status_code < 500, r.text
    return [r.status_code for r in responses]


async def _scalar(world: World, stmt: Any) -> int:
    async with world.app.state.sessionmaker() as session:
        return int(await session.scalar(stmt) or 0)


async def test_concurrent_user_creations_stop_at_the_org_cap(world: World) -> None:
    enabled = select(func.count()).where(User.org_id == world.org_a.id, User.disabled_at.is_(None))
    before = await _scalar(world, enabled)  # member_a, member_a2, admin_a
    bodies = [{"name": f"burst-{i}", "role": "member"} for i in range(BURST)]
    statuses = await _burst(world, "admin_a", "POST", ["/v1/users"] * BURST, bodies)
    assert await _scalar(world, enabled) == CAP
    assert statuses.count(201) == CAP - before
    assert statuses.count(409) == BURST - (CAP - before)


async def test_concurrent_user_creations_stop_at_the_org_cap_of_rows(database_url: str) -> None:
    """The cap on the rows an org keeps, disabled users included, holds under a burst as the
    enabled users' cap does (the org's row locked while it counts)."""
    async with running_app(
        database_url, max_users_per_org=100, max_user_rows_per_org=CAP, change_burst=1000
    ) as app:
        world = await seed_world(app)
        async with world.client("admin_a") as c:  # a disabled user still counts
            made = await c.post("/v1/users", json={"name": "gone", "role": "member"})
            assert (await c.delete(f"/v1/users/{made.json()['id']}")).status_code == 200
        kept = select(func.count()).where(User.org_id == world.org_a.id)
        before = await _scalar(world, kept)  # member_a, member_a2, admin_a, gone
        bodies = [{"name": f"burst-{i}", "role": "member"} for i in range(BURST)]
        statuses = await _burst(world, "admin_a", "POST", ["/v1/users"] * BURST, bodies)
        assert await _scalar(world, kept) == CAP
        assert statuses.count(201) == CAP - before
        assert statuses.count(409) == BURST - (CAP - before)


async def test_concurrent_token_issues_stop_at_the_user_cap(world: World) -> None:
    user_id = world.users["member_a"].id
    live = select(func.count()).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
    before = await _scalar(world, live)
    bodies = [{"name": f"t{i}"} for i in range(BURST)]
    statuses = await _burst(world, "member_a", "POST", ["/v1/tokens"] * BURST, bodies)
    assert await _scalar(world, live) == CAP
    assert statuses.count(201) == CAP - before


@pytest.mark.parametrize("action", ["hold", "release"])
async def test_concurrent_job_actions_store_at_most_the_bound_of_events(
    world: World, action: str
) -> None:
    job = await world.job("member_a", held=action == "release")
    paths = [f"/v1/jobs/{job.id}/{action}"] * BURST
    await _burst(world, "member_a", "POST", paths, [None] * BURST)
    kind = f"job.{action}"
    stored = select(func.count()).where(Event.job_id == job.id, Event.kind == kind)
    folded = select(func.count()).where(Event.job_id == job.id, Event.kind == kind + ".more")
    assert await _scalar(world, stored) <= CAP
    assert await _scalar(world, folded) <= 1


async def test_concurrent_submissions_stop_at_the_user_cap(database_url: str) -> None:
    """Both databases hold the pending-job cap exactly: SQLite (one writer) counts under its
    write lock, PostgreSQL's one-statement submission under the user's and the org's advisory
    locks (scheduler/services/tenantlimits.py, tests/api/test_tenant_limits.py)."""
    async with running_app(database_url, max_pending_jobs_per_user=CAP, submit_burst=1000) as app:
        world = await seed_world(app)
        job = {"command": ["sleep", "1"], "time_limit": 60}
        statuses = await _burst(world, "member_a", "POST", ["/v1/jobs"] * BURST, [job] * BURST)
        pending = select(func.count()).where(Job.user_id == world.users["member_a"].id)
        assert await _scalar(world, pending) == CAP
        assert statuses.count(201) == CAP
