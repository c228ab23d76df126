"""What one request may make the server hold: answers bounded in bytes and in rows.

A member's own jobs are within every cap, yet each may carry 128 KiB of command and
environment, which JSON escapes to six times that: a page of 500 such jobs was one answer of
390 MB for the server to load, build and send, as often as the member asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, insert

from scheduler.db import Org, User
from scheduler.db.types import utcnow
from scheduler.services.joblist import MAX_PAGE_TEXT_BYTES
from scheduler.services.tokens import issue_token
from scheduler.states import Role, TokenKind
from tests import factories
from tests.api.helpers import World, running_app, seed_world
from tests.scheduling.harness import fast_settings, running_cluster

# Control characters: stored and answered as \u0001, six bytes each (about 770 KB a job).
FAT = "\x01" * 64_000


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)


async def test_a_page_of_jobs_stops_at_its_byte_budget_and_the_cursor_goes_on(
    world: World,
) -> None:
    """16 fat jobs (12 MB as JSON) asked for in one page of 500: the page stops within the
    budget with a cursor, and following it lists every job once, newest first."""
    async with world.app.state.sessionmaker() as session:
        org = await session.get(Org, world.org_a.id)
        assert org is not None
        ids = [
            (
                await factories.job(
                    session, org, world.users["member_a"], command=["x", FAT], env={"A": FAT}
                )
            ).id
            for _ in range(16)
        ]
        await session.commit()
    seen: list[int] = []
    pages = 0
    cursor: str | None = None
    async with world.client("member_a") as c:
        for _ in range(16):
            params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            r = await c.get("/v1/jobs", params=params)
            assert r.status_code == 200, r.text
            assert len(r.content) <= MAX_PAGE_TEXT_BYTES + (1 << 20), len(r.content)
            page = r.json()
            pages += 1
            assert page["data"], page["next_cursor"]
            seen += [job["id"] for job in page["data"]]
            assert all(job["env"] == {"A": FAT} for job in page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == sorted(ids, reverse=True)
    assert pages > 1


async def test_one_job_beyond_the_budget_is_still_listed(world: World) -> None:
    """The budget never empties a page: a job is always listed, however large."""
    job = await world.job("member_b", command=["x", FAT], env={"A": FAT})
    async with world.client("member_b") as c:
        r = await c.get("/v1/jobs", params={"limit": 500})
    page = r.json()
    assert [j["id"] for j in page["data"]] == [job.id]
    assert page["next_cursor"] is None


async def test_token_listings_come_in_pages(world: World) -> None:
    """An org admin may make 1,000 users of 100 live tokens each; a platform admin's listing
    carried them all in one answer. 600 live tokens of another org come in pages of at most
    500, the revoked ones on the first page only, and the cursor lists every one once."""
    async with world.app.state.sessionmaker() as session:
        for n in range(600):
            user = world.users["member_b" if n % 2 else "admin_b"]
            await issue_token(session, kind=TokenKind.USER, user_id=user.id, ttl_s=3600)
        await session.commit()
    async with world.client("member_a") as c:
        dead = (await c.post("/v1/tokens", json={"name": "dead"})).json()["id"]
        assert (await c.delete(f"/v1/tokens/{dead}")).status_code == 200
    seen: list[int] = []
    pages: list[list[int]] = []
    async with world.client("platform") as c:
        cursor: str | None = None
        while True:
            r = await c.get("/v1/tokens", params={"cursor": cursor} if cursor else {})
            assert r.status_code == 200, r.text
            page = r.json()
            pages.append([t["id"] for t in page["data"] if t["revoked_at"] is None])
            seen += [t["id"] for t in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert [len(p) for p in pages] == [500, 600 + len(world.users) - 500]
    assert len(seen) == len(set(seen)) == 600 + len(world.users) + 1  # a token each, and dead
    assert seen.count(dead) == 1


async def test_an_org_of_many_disabled_users_lists_its_users_in_pages_and_its_tokens(
    world: World,
) -> None:
    """Disabled users stay and the cap counts enabled ones, so an org admin's loop of create
    and disable grows the org's rows without end. 33,000 of them: `GET /v1/users` comes in
    pages that list each once, and the org admin's token listing still answers (it named every
    user of the org in one statement, past PostgreSQL's 32,767 parameters: a 500)."""
    async with world.app.state.sessionmaker() as session:
        rows = [
            {"name": f"gone-{n}", "org_id": world.org_a.id, "role": Role.MEMBER,
             "disabled_at": utcnow()}
            for n in range(33_000)
        ]  # fmt: skip
        await session.execute(insert(User), rows)
        await session.commit()
    async with world.client("admin_a") as c:
        tokens = await c.get("/v1/tokens")
        assert tokens.status_code == 200, tokens.text
        assert {t["user_id"] for t in tokens.json()["data"]} == {
            world.users[k].id for k in ("member_a", "member_a2", "admin_a")
        }
        seen: list[int] = []
        cursor: str | None = None
        while True:
            r = await c.get("/v1/users", params={"cursor": cursor} if cursor else {})
            assert r.status_code == 200, r.text
            assert r.json()["count"] <= 500
            seen += [u["id"] for u in r.json()["data"]]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
    assert len(seen) == len(set(seen)) == 33_000 + 3


async def test_concurrent_scrapes_share_one_read_of_the_cluster(database_url: str) -> None:
    """Without a metrics token anyone may scrape /metrics, and each scrape held a connection of
    the pool every tenant shares while its queries ran: 40 at once now read the cluster once
    (or twice, should some arrive as the first read ends), and each gets the gauges."""
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    async with running_cluster(fast_settings(database_url, run_scheduler=False)) as cluster:
        engine = cluster.app.state.engine.sync_engine
        c = cluster.http
        assert (await c.get("/metrics")).status_code == 200
        event.listen(engine, "before_cursor_execute", count)
        try:
            before = statements
            one = await c.get("/metrics")
            per_read = statements - before
            answers = await asyncio.gather(*(c.get("/metrics") for _ in range(40)))
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert per_read > 0
    assert all(r.status_code == 200 for r in answers)
    assert all(b"fairgpu_gpus" in r.content for r in [one, *answers])
    assert statements - before - per_read <= 2 * per_read, (statements, per_read)


async def test_concurrent_readiness_probes_share_one_check(database_url: str) -> None:
    """/readyz needs no token and has no rate, and each probe held a connection of the pool
    every tenant shares while it asked the database: 40 at once now check it once (or twice,
    should some arrive as the first check ends), and each gets the answer."""
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    async with running_cluster(fast_settings(database_url, run_scheduler=False)) as cluster:
        engine = cluster.app.state.engine.sync_engine
        c = cluster.http
        assert (await c.get("/readyz")).status_code == 200
        event.listen(engine, "before_cursor_execute", count)
        try:
            before = statements
            one = await c.get("/readyz")
            per_check = statements - before
            answers = await asyncio.gather(*(c.get("/readyz") for _ in range(40)))
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert per_check > 0
    assert all(r.status_code == 200 for r in [one, *answers])
    assert all(r.json()["status"] == "ready" for r in answers)
    assert statements - before - per_check <= 2 * per_check, (statements, per_check)


async def test_node_listings_come_in_pages_and_find_one_by_name(world: World) -> None:
    """Every member may list the nodes, and a pool of thousands of nodes made each answer
    megabytes: 520 nodes come in pages of at most 500 by name, each once; `name` finds one."""
    async with world.app.state.sessionmaker() as session:
        names = [(await factories.node(session, gpus=1))[0].name for _ in range(520)]
        await session.commit()
    seen: list[str] = []
    sizes: list[int] = []
    async with world.client("member_b") as c:
        cursor: str | None = None
        while True:
            r = await c.get("/v1/nodes", params={"cursor": cursor} if cursor else {})
            assert r.status_code == 200, r.text
            sizes.append(r.json()["count"])
            seen += [n["name"] for n in r.json()["data"]]
            cursor = r.json().get("next_cursor")
            if cursor is None:
                break
        one = (await c.get("/v1/nodes", params={"name": names[7]})).json()["data"]
    assert sizes == [500, 21]  # and the world's own node
    assert len(seen) == len(set(seen)) == 521
    assert set(names) < set(seen)
    assert [n["name"] for n in one] == [names[7]]
