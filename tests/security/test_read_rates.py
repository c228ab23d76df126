"""Reads (GET) are rate-limited like changes: per token before the token is looked up, then
per user over all their tokens and per org over all its users. Before, a token could send
listings, usage reports and explains as fast as the server answered them, and the server's
CPU and connection pool were the flooding tenant's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.helpers import World, client, running_app, seed_world

BURST = 3


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    settings = {
        "read_rate_per_s": 0.01,
        "read_burst": BURST,
        "org_read_rate_per_s": 0.01,
        "org_read_burst": BURST + 2,
    }
    async with running_app(database_url, **settings) as app:
        yield await seed_world(app)


async def _reads(world: World, token: str, n: int) -> list[int]:
    async with client(world.app, token) as c:
        return [(await c.get("/v1/jobs")).status_code for _ in range(n)]


async def test_a_token_past_its_read_burst_is_429_and_others_are_served(world: World) -> None:
    async with world.client("member_a") as c:
        answers = [await c.get("/v1/jobs") for _ in range(BURST + 1)]
        change = await c.post("/v1/tokens", json={"name": "still-allowed"})
    assert [r.status_code for r in answers] == [200] * BURST + [429]
    refused = answers[-1]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["rate_per_s"] == 0.01
    assert "reads (GET)" in refused.json()["detail"]
    assert change.status_code == 201, change.text  # changes have their own bucket
    assert await _reads(world, world.tokens["member_b"], BURST) == [200] * BURST


async def test_a_user_cannot_multiply_its_read_rate_with_tokens(world: World) -> None:
    async with world.client("member_a") as c:
        more = [(await c.post("/v1/tokens", json={"name": f"t{i}"})).json()["token"] for i in "12"]
    assert await _reads(world, world.tokens["member_a"], BURST) == [200] * BURST
    for token in more:  # each a full bucket of its own, but the user's is empty
        assert await _reads(world, token, 1) == [429]


async def test_an_org_cannot_multiply_its_read_rate_with_users(world: World) -> None:
    assert await _reads(world, world.tokens["member_a"], BURST) == [200] * BURST
    assert await _reads(world, world.tokens["member_a2"], 3) == [200, 200, 429]
    assert await _reads(world, world.tokens["member_b"], BURST) == [200] * BURST
