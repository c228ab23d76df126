"""Bounds that keep one tenant from taking the server away from the others, hit on purpose.

Each bound answers a clear 4xx (problem JSON) and leaves what was stored intact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from api.admission import TokenBuckets
from scheduler.db import JobDependency
from scheduler.services import users as users_service
from scheduler.services.auditretention import AuditRetention
from tests.api.helpers import World, running_app, seed_world

JOB = {"command": ["python", "train.py"], "gpus_per_node": 1, "time_limit": 60}


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url, max_tokens_per_user=3) as app:
        yield await seed_world(app)


async def test_a_user_cannot_multiply_its_rate_with_tokens(world: World) -> None:
    """Rate limits are per token: a user minting tokens without end would mint rate. Past
    `max_tokens_per_user` live tokens a new one is 409, whoever asks for it; revoking one (or
    one expiring) makes room again."""
    async with world.client("member_a") as c:
        made = []
        for _ in range(2):  # the seeded token is the first
            r = await c.post("/v1/tokens", json={"name": "more"})
            assert r.status_code == 201, r.text
            made.append(r.json())
        refused = await c.post("/v1/tokens", json={"name": "one-too-many"})
        assert refused.status_code == 409
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["limit"] == "max_tokens_per_user"
        assert refused.json()["cap"] == 3
        listed = (await c.get("/v1/tokens")).json()
        assert listed["count"] == 3  # nothing half-made
        # Every token still works; none was revoked to make room.
        for token in made:
            c.headers["Authorization"] = f"Bearer {token['token']}"
            assert (await c.get("/v1/users/me")).status_code == 200
        assert (await c.delete(f"/v1/tokens/{made[0]['id']}")).status_code == 200
        assert (await c.post("/v1/tokens", json={"name": "again"})).status_code == 201
    async with world.client("admin_a") as c:  # an admin cannot exceed it on the user's behalf
        r = await c.post("/v1/tokens", json={"user_id": world.users["member_a"].id})
        assert r.status_code == 409
    async with world.client("member_a2") as c:  # the cap is each user's own
        assert (await c.post("/v1/tokens", json={"name": "mine"})).status_code == 201


async def test_a_new_token_lives_the_servers_token_lifetime(world: World) -> None:
    async with world.client("member_a2") as c:
        created = (await c.post("/v1/tokens", json={"name": "default"})).json()
    expires = datetime.fromisoformat(created["expires_at"])
    lifetime = expires - datetime.fromisoformat(created["created_at"])
    settings = world.app.state.settings
    assert abs(lifetime - timedelta(seconds=settings.token_ttl_s)) < timedelta(minutes=1)


@pytest.fixture
async def follows(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url, max_log_follows_per_user=2) as app:
        yield await seed_world(app)


async def test_a_user_holds_a_bounded_number_of_waiting_log_reads(follows: World) -> None:
    """Each waiting log read polls the database twice a second: one user opening thousands
    would load it for everyone. Past `max_log_follows_per_user` waits, 429 with Retry-After;
    reads that do not wait, and other users, are unaffected; an ended wait frees its place."""
    world = follows
    job = await world.job("member_a")  # pending: no output yet, so a read with wait_s waits
    path = f"/v1/jobs/{job.id}/logs"
    async with world.client("member_a") as mine, world.client("member_a2") as colleague:
        held = [asyncio.create_task(mine.get(path, params={"wait_s": 3})) for _ in range(2)]
        user_id = world.users["member_a"].id
        for _ in range(100):  # both are waiting once they hold their places
            if world.app.admission.follows.held(user_id) == 2:
                break
            await asyncio.sleep(0.05)
        assert not any(t.done() for t in held)
        refused = await mine.get(path, params={"wait_s": 3})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["limit"] == 2
        assert (await mine.get(path)).status_code == 200  # no wait: no place taken
        assert (await colleague.get(path, params={"wait_s": 0.2})).status_code == 200
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await mine.get(path, params={"wait_s": 0.2})).status_code == 200


@pytest.fixture
async def org_follows(database_url: str) -> AsyncIterator[World]:
    async with running_app(
        database_url, max_log_follows_per_user=2, max_log_follows_per_org=3
    ) as app:
        yield await seed_world(app)


async def test_an_org_holds_a_bounded_number_of_waiting_log_reads(org_follows: World) -> None:
    """The per-user bound alone is multiplied by the org's users (an org admin makes up to
    `max_users_per_org` of them): past `max_log_follows_per_org` waits of one org, 429 with
    Retry-After for every user of it; another org's users are unaffected."""
    world = org_follows
    job = await world.job("member_a")
    theirs = await world.job("member_b")
    path = f"/v1/jobs/{job.id}/logs"
    wait = {"wait_s": 3}
    async with (
        world.client("member_a") as ada,
        world.client("member_a2") as bob,
        world.client("admin_a") as admin,
        world.client("member_b") as rival,
    ):
        held = [asyncio.create_task(ada.get(path, params=wait)) for _ in range(2)]
        held.append(asyncio.create_task(bob.get(path, params=wait)))
        for _ in range(100):  # all three are waiting once they hold their places
            if sum(world.app.admission.follows.held(u.id) for u in world.users.values()) == 3:
                break
            await asyncio.sleep(0.05)
        assert not any(t.done() for t in held)
        refused = await admin.get(path, params=wait)  # a user holding none, of the same org
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["limit"] == 3
        assert "org" in refused.json()["detail"]
        other = await rival.get(f"/v1/jobs/{theirs.id}/logs", params={"wait_s": 0.2})
        assert other.status_code == 200
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert (await admin.get(path, params={"wait_s": 0.2})).status_code == 200


@pytest.fixture
async def changes(database_url: str) -> AsyncIterator[World]:
    # One change per 100 s: a loaded machine cannot refill a change between two requests.
    async with running_app(database_url, change_rate_per_s=0.01, change_burst=3) as app:
        yield await seed_world(app)


async def test_changes_past_the_rate_are_429_and_change_nothing(changes: World) -> None:
    """Update, hold, release, cancel and the other changes are write transactions: one token
    sending them without pause would take the database's writes from everyone. Past the
    change rate, 429 with Retry-After, before the body is read; the job is as the last
    accepted change left it. Reads, submissions and other tokens are unaffected."""
    world = changes
    job = await world.job("member_a")
    path = f"/v1/jobs/{job.id}"
    async with world.client("member_a") as c:
        began = time.monotonic()
        accepted = [
            (await c.post(f"{path}/hold")).status_code,
            (await c.patch(path, json={"name": "renamed"})).status_code,
            (await c.post(f"{path}/release")).status_code,
        ]
        assert accepted == [200, 200, 200]
        refused = await c.patch(path, json={"hold": True, "name": "too-fast"})
        assert refused.status_code == 429
        # 100 s a change, less what refilled since the first of the 3 sent (3 s at CI's load).
        refilled_s = time.monotonic() - began
        assert 99 - refilled_s <= int(refused.headers["retry-after"]) <= 100
        assert "changes (POST, PATCH, PUT, DELETE) per second" in refused.json()["detail"]
        assert (await c.post(f"{path}/cancel")).status_code == 429
        assert (await c.post("/v1/tokens", json={"name": "t"})).status_code == 429
        stored = (await c.get(path)).json()
        assert (stored["state"], stored["held"], stored["name"]) == ("PENDING", False, "renamed")
        submitted = await c.post("/v1/jobs", json={"command": ["x"], "time_limit": 60})
        assert submitted.status_code == 201
    async with world.client("member_a2") as c:
        theirs = await world.job("member_a2")
        assert (await c.post(f"/v1/jobs/{theirs.id}/hold")).status_code == 200


async def test_dependencies_are_bounded_and_cannot_close_a_cycle(world: World) -> None:
    """A job names at most 64 jobs, each already stored and of its org, and its dependencies
    never change after submission: a dependency graph grows only backwards in time (no cycle)
    and by at most 64 edges per pending job (the pending caps bound the jobs)."""
    first = await world.job("member_a")
    async with world.client("member_a") as c:
        wide = ":".join(str(first.id + i) for i in range(65))
        r = await c.post("/v1/jobs", json={**JOB, "dependency": f"afterany:{wide}"})
        assert r.status_code == 422
        assert "at most 64" in r.text
        r = await c.post("/v1/jobs", json={**JOB, "dependency": "afterok:1" + ":1" * 1100})
        assert r.status_code == 422
        ahead = first.id + 1  # the id the next job will get: not stored yet
        r = await c.post("/v1/jobs", json={**JOB, "dependency": f"afterok:{ahead}"})
        assert r.status_code == 422, r.text
        r = await c.post("/v1/jobs", json={**JOB, "depends_on": [first.id]})
        assert r.status_code == 201
        second = r.json()["id"]
        r = await c.patch(f"/v1/jobs/{first.id}", json={"dependency": f"afterok:{second}"})
        assert r.status_code == 422  # no route changes a job's dependencies
    async with world.app.state.sessionmaker() as session:
        edges = (
            await session.execute(select(JobDependency.job_id, JobDependency.depends_on_id))
        ).all()
    assert [tuple(e) for e in edges] == [(second, first.id)]


def test_spraying_made_up_tokens_does_not_refill_a_drained_bucket() -> None:
    """Buckets are keyed by the bearer before it is checked, so anyone can add keys. A client
    that has drained its bucket and then sends requests with many made-up tokens must not get
    its own bucket forgotten (and so refilled); the memory stays bounded."""
    buckets = TokenBuckets(rate_per_s=0.01, burst=5, max_keys=100)
    assert [buckets.take("mine", now=0.0) for _ in range(5)] == [0.0] * 5
    for i in range(1_000):
        buckets.take(f"made-up-{i}", now=1.0)
        assert len(buckets) <= 100
    assert buckets.take("mine", now=1.0) > 0  # still drained: refused


@pytest.mark.parametrize("who", ["member_a", "platform"])
async def test_numbers_beyond_an_id_in_job_filters_are_not_500(world: World, who: str) -> None:
    """`?user=` and `?org=` take a name or an id; a number beyond the id column reached
    PostgreSQL, which refused it: 500 for any member. Now it names no one."""
    async with world.client(who) as c:
        for number in ("9" * 11, "9" * 30, "0"):
            users = await c.get("/v1/jobs", params={"user": number})
            assert users.status_code == 200, users.text
            assert users.json()["data"] == []
            orgs = await c.get("/v1/jobs", params={"org": number})
            assert orgs.status_code == 404, orgs.text
            assert orgs.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/jobs?user=a%00b",
        "/v1/jobs?org=a%00b",
        "/v1/usage?org=a%00b",
        "/v1/orgs/a%00b",
        "/v1/orgs/a%00b/quota",
    ],
)
async def test_a_nul_in_a_url_is_400(world: World, url: str) -> None:
    """A NUL character in a name looked up in the database (PostgreSQL refuses it): 500 for
    any member. No name or id holds one."""
    async with world.client("member_a") as c:
        r = await c.get(url)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    async with world.client("member_a") as c:
        r = await c.post("/v1/jobs", json={**JOB, "org": "a\x00b"})
    assert r.status_code == 422, r.text


@pytest.fixture
async def staffed(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url, max_users_per_org=4) as app:
        yield await seed_world(app)


async def test_an_org_admin_cannot_multiply_its_orgs_rate_with_users(staffed: World) -> None:
    """Rates and stream caps are per token and per user: an org admin creating users without
    end would multiply them. Past `max_users_per_org` enabled users a new one is 409, whoever
    asks; disabling one makes room; another org has its own count."""
    async with staffed.client("admin_a") as c:  # org-a has 3 users
        made = await c.post("/v1/users", json={"name": "fourth", "role": "member"})
        assert made.status_code == 201, made.text
        refused = await c.post("/v1/users", json={"name": "fifth", "role": "member"})
        assert refused.status_code == 409
        assert refused.headers["content-type"].startswith("application/problem+json")
        body = refused.json()
        assert (body["limit"], body["cap"], body["count"]) == ("max_users_per_org", 4, 4)
        listed = (await c.get("/v1/users")).json()
        assert sorted(u["name"] for u in listed["data"]) == [
            "admin-a", "fourth", "member-a", "member-a2"
        ]  # fmt: skip
    async with staffed.client("platform") as c:  # the cap is the org's, whoever creates
        r = await c.post("/v1/users", json={"name": "fifth", "role": "member", "org": "org-a"})
        assert r.status_code == 409
    async with staffed.client("admin_b") as c:
        for name in ("b3", "b4"):
            r = await c.post("/v1/users", json={"name": name, "role": "member"})
            assert r.status_code == 201
    async with staffed.client("admin_a") as c:
        disabled = await c.delete(f"/v1/users/{made.json()['id']}")
        assert disabled.status_code == 200
        again = await c.post("/v1/users", json={"name": "fifth", "role": "member"})
        assert again.status_code == 201, again.text


async def test_an_org_admin_cannot_grow_the_users_table_by_disabling(database_url: str) -> None:
    """Creating and disabling users (one change each) kept every row for ever, each name taken
    in the org. Past `max_user_rows_per_org` users, disabled ones included, a new one is
    409 whoever asks; once the audit retention has deleted disabled users that own nothing,
    the org has room again and their names are free in it."""
    async with running_app(database_url, max_users_per_org=4, max_user_rows_per_org=5) as app:
        world = await seed_world(app)
        async with world.client("admin_a") as c:  # org-a keeps 3 users
            for name in ("fourth", "fifth"):
                made = await c.post("/v1/users", json={"name": name, "role": "member"})
                assert made.status_code == 201, made.text
                disabled = await c.delete(f"/v1/users/{made.json()['id']}")
                assert disabled.status_code == 200
            refused = await c.post("/v1/users", json={"name": "sixth", "role": "member"})
            assert refused.status_code == 409, refused.text  # 3 enabled, 5 kept
            assert refused.headers["content-type"].startswith("application/problem+json")
            body = refused.json()
            assert (body["limit"], body["cap"], body["count"]) == ("max_user_rows_per_org", 5, 5)
        async with world.client("platform") as c:  # the cap is the org's, whoever creates
            r = await c.post("/v1/users", json={"name": "sixth", "role": "member", "org": "org-a"})
            assert r.status_code == 409
        async with world.client("admin_a") as c:  # a disabled user keeps its name in its org
            taken = await c.post("/v1/users", json={"name": "fourth", "role": "member"})
            assert taken.json()["detail"] == "user 'fourth' already exists in this org"
        async with world.client("admin_b") as c:  # and no other org's
            beside = await c.post("/v1/users", json={"name": "fourth", "role": "member"})
            assert beside.status_code == 201, beside.text

        later = datetime.now(UTC) + timedelta(seconds=app.state.settings.audit_retention_s + 60)
        retention = AuditRetention(app.state.settings.audit_retention_s)
        _, _, users = await retention.run_pass(app.state.sessionmaker, now=later)
        assert users == 2
        async with world.client("admin_a") as c:
            freed = await c.post("/v1/users", json={"name": "fourth", "role": "member"})
            assert freed.status_code == 201, freed.text  # room again, and the name


async def test_a_token_listing_shows_live_tokens_and_only_the_latest_dead_ones(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop of issue and revoke leaves dead rows until audit retention deletes them: a
    listing shows every live token but only the latest MAX_DEAD_TOKENS_LISTED dead ones, so
    one request never loads them all."""
    monkeypatch.setattr(users_service, "MAX_DEAD_TOKENS_LISTED", 2)
    async with world.client("member_a2") as c:
        revoked = []
        for round_ in range(4):
            made = await c.post("/v1/tokens", json={"name": f"t{round_}"})
            assert made.status_code == 201, made.text
            token_id = made.json()["id"]
            assert (await c.delete(f"/v1/tokens/{token_id}")).status_code == 200
            revoked.append(token_id)
        kept = await c.post("/v1/tokens", json={"name": "kept"})
        listed = (await c.get("/v1/tokens")).json()
        ids = [t["id"] for t in listed["data"]]
        live = [t["id"] for t in listed["data"] if t["revoked_at"] is None]
        assert len(live) == 2  # the seeded token and "kept"
        assert kept.json()["id"] in live
        assert ids == sorted([*live, *revoked[-2:]])  # the two latest dead, in id order
        assert listed["count"] == 4
