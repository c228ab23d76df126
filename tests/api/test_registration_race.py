"""Agents registering at once at a site nobody has seen yet all succeed, on both databases."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from scheduler.db import Node, Site
from scheduler.services.tokens import issue_token
from scheduler.states import TokenKind
from tests.api.helpers import World

AGENTS = 6


def _body(name: str, site: str) -> dict[str, object]:
    return {
        "name": name,
        "site": site,
        "domain": "rack1",
        "hostname": name,
        "address": "127.0.0.1",
        "agent_version": "test",
        "gpus": [
            {"index": i, "uuid": f"GPU-{name}-{i}", "model": "H100", "memory_bytes": 80 << 30}
            for i in range(2)
        ],
    }


async def test_concurrent_registrations_at_a_new_site(world: World) -> None:
    # An unlimited join token: nothing else serialises the registrations (a counted token's
    # row lock would, and would hide the race).
    async with world.app.state.sessionmaker() as session:
        join = (await issue_token(session, kind=TokenKind.JOIN, uses_left=None)).secret
        await session.commit()
    headers = {"Authorization": f"Bearer {join}"}
    for round_ in range(3):
        site = f"new-dc-{round_}"
        async with world.client(None) as c:
            replies = await asyncio.gather(
                *(
                    c.post(
                        "/v1/agent/register",
                        json=_body(f"n{round_}-{i}", site),
                        headers=headers,
                    )
                    for i in range(AGENTS)
                )
            )
        assert [r.status_code for r in replies] == [200] * AGENTS, [r.text for r in replies]
        async with world.app.state.sessionmaker() as session:
            sites = (await session.scalars(select(Site.id).where(Site.name == site))).all()
            assert len(sites) == 1
            nodes = await session.scalar(
                select(func.count()).select_from(Node).where(Node.site_id == sites[0])
            )
            assert nodes == AGENTS
