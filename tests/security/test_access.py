"""Access gaps the matrix in tests/api/test_authz_matrix.py leaves: expired and used-up
credentials of every kind, and a member walking every job id there is (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from scheduler.db.types import utcnow
from scheduler.services.tokens import issue_token
from scheduler.states import TokenKind
from tests.api.helpers import World, running_app, seed_world

SUBRESOURCES = ("", "/explain", "/logs", "/events")
ACTIONS = ("/cancel", "/hold", "/release")
REGISTER = {
    "name": "late", "site": "s", "domain": "d", "hostname": "h", "address": "a",
    "agent_version": "v", "gpus": [],
}  # fmt: skip


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)


async def test_expired_credentials_of_every_kind_are_refused(world: World) -> None:
    assert world.node is not None
    past = utcnow() - timedelta(hours=2)
    async with world.app.state.sessionmaker() as session:
        user = await issue_token(
            session, kind=TokenKind.USER, user_id=world.users["member_a"].id, ttl_s=60, now=past
        )
        agent = await issue_token(
            session, kind=TokenKind.AGENT, node_id=world.node.id, ttl_s=60, now=past
        )
        join = await issue_token(session, kind=TokenKind.JOIN, ttl_s=60, now=past)
        used_up = await issue_token(session, kind=TokenKind.JOIN, uses_left=0)
        await session.commit()
    async with world.client(None) as c:
        for secret, method, path in [
            (user.secret, "GET", "/v1/jobs"),
            (user.secret, "GET", "/v1/users/me"),
            (agent.secret, "POST", "/v1/agent/heartbeat"),
            (join.secret, "POST", "/v1/agent/register"),
            (used_up.secret, "POST", "/v1/agent/register"),
        ]:
            body = REGISTER if path.endswith("register") else {} if method == "POST" else None
            r = await c.request(
                method, path, json=body, headers={"Authorization": f"Bearer {secret}"}
            )
            assert r.status_code == 401, (secret[:5], path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")


async def test_walking_every_job_id_shows_only_your_org(world: World) -> None:
    mine = {(await world.job("member_a")).id for _ in range(3)}
    mine.add((await world.job("member_a2")).id)
    theirs = {(await world.job("member_b")).id for _ in range(3)}
    top = max(mine | theirs) + 3
    async with world.client("member_a") as c:
        for job_id in range(1, top):
            for sub in SUBRESOURCES:
                r = await c.get(f"/v1/jobs/{job_id}{sub}")
                expected = 200 if job_id in mine else 404
                assert r.status_code == expected, (job_id, sub, r.text)
            if job_id in theirs:
                for action in ACTIONS:
                    r = await c.post(f"/v1/jobs/{job_id}{action}")
                    assert r.status_code == 404, (job_id, action, r.text)
        listed = {j["id"] for j in (await c.get("/v1/jobs?limit=500")).json()["data"]}
    assert listed == mine
    async with world.client("member_b") as c:
        states = {(await c.get(f"/v1/jobs/{j}")).json()["state"] for j in theirs}
    assert states == {"PENDING"}, "member_a's attempts changed nothing of org B"
