"""Submissions and other changes are rate-limited per user over all their tokens and per org
over all its users, as reads are (tests/security/test_read_rates.py). Before, only each token
had a bucket: an org admin's 1,000 users of 100 tokens each held 100,000 full buckets, and
the org could send submissions and changes (cancel, hold, update, tokens, users) at 100,000
times the rate, the server's CPU and database going to that one tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from scheduler.services.tokens import issue_token
from scheduler.states import TokenKind
from tests.api.helpers import World, client, running_app, seed_world

BURST = 3
JOB = {"command": ["true"], "time_limit": 60}


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    settings = {
        "submit_rate_per_s": 0.01,
        "submit_burst": BURST,
        "org_submit_rate_per_s": 0.01,
        "org_submit_burst": BURST + 2,
        "change_rate_per_s": 0.01,
        "change_burst": BURST,
        "org_change_rate_per_s": 0.01,
        "org_change_burst": BURST + 2,
    }
    async with running_app(database_url, **settings) as app:
        yield await seed_world(app)


async def _more_tokens(world: World, owner: str, n: int) -> list[str]:
    """Tokens made in the database, so that making them spends no change."""
    async with world.app.state.sessionmaker() as session:
        tokens = [
            (
                await issue_token(
                    session, kind=TokenKind.USER, user_id=world.users[owner].id, ttl_s=3600
                )
            ).secret
            for _ in range(n)
        ]
        await session.commit()
    return tokens


async def _submits(world: World, token: str, n: int) -> list[int]:
    async with client(world.app, token) as c:
        return [(await c.post("/v1/jobs", json=JOB)).status_code for _ in range(n)]


async def _holds(world: World, token: str, job_id: int, n: int) -> list[int]:
    async with client(world.app, token) as c:
        return [(await c.post(f"/v1/jobs/{job_id}/hold")).status_code for _ in range(n)]


async def test_a_user_cannot_multiply_its_submission_rate_with_tokens(world: World) -> None:
    """Past the user's burst, each of its other tokens (a full bucket of its own) is 429, on
    the direct route (PostgreSQL's plain submissions) as on the ordinary one."""
    assert await _submits(world, world.tokens["member_a"], BURST) == [201] * BURST
    for token in await _more_tokens(world, "member_a", 2):
        async with client(world.app, token) as c:
            refused = await c.post("/v1/jobs", json=JOB)
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["retry-after"]) >= 1
        assert "from your tokens together" in refused.json()["detail"]
    assert await _submits(world, world.tokens["member_b"], 1) == [201]  # another org's own


async def test_an_org_cannot_multiply_its_submission_rate_with_users(world: World) -> None:
    assert await _submits(world, world.tokens["member_a"], BURST) == [201] * BURST
    assert await _submits(world, world.tokens["member_a2"], 3) == [201, 201, 429]
    async with client(world.app, world.tokens["admin_a"]) as c:
        refused = await c.post("/v1/jobs", json=JOB)
    assert refused.status_code == 429
    assert "from your org's users together" in refused.json()["detail"]
    assert await _submits(world, world.tokens["member_b"], BURST) == [201] * BURST


async def test_an_array_pays_its_elements_into_the_users_bucket(world: World) -> None:
    async with client(world.app, world.tokens["member_a"]) as c:
        array = await c.post("/v1/jobs", json={**JOB, "array": f"0-{BURST - 1}"})
    assert array.status_code == 201, array.text
    [token] = await _more_tokens(world, "member_a", 1)
    assert await _submits(world, token, 1) == [429]


async def test_users_and_orgs_cannot_multiply_their_change_rate(world: World) -> None:
    mine = await world.job("member_a")
    theirs = await world.job("member_a2")
    statuses = await _holds(world, world.tokens["member_a"], mine.id, BURST)
    assert 429 not in statuses, statuses
    [token] = await _more_tokens(world, "member_a", 1)
    assert await _holds(world, token, mine.id, 1) == [429]  # the user's bucket is empty
    statuses = await _holds(world, world.tokens["member_a2"], theirs.id, 3)
    assert 429 not in statuses[:2], statuses
    assert statuses[-1] == 429, statuses  # the org's is empty
    other = await world.job("member_b")
    assert 429 not in await _holds(world, world.tokens["member_b"], other.id, BURST)


async def test_a_submission_the_direct_route_hands_on_pays_once(world: World) -> None:
    """On PostgreSQL a plain submission is served before routing (api/direct.py); one it
    hands on (an array, an image, dependencies...) is charged by the ordinary route, and must
    not have been charged on the way as well."""
    async with client(world.app, world.tokens["member_a"]) as c:
        statuses = [(await c.post("/v1/jobs", json=JOB)).status_code]  # the token now cached
        for _ in range(BURST):
            r = await c.post("/v1/jobs", json={**JOB, "array": "0"})  # handed on
            statuses.append(r.status_code)
    assert statuses == [201] * BURST + [429]
