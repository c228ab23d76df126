"""The real app over HTTP for API tests: a running lifespan, a seeded world, token clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.app import create_app
from scheduler.db import Job, Node, Org, User
from scheduler.services.tokens import issue_token
from scheduler.settings import Settings
from scheduler.states import Role, TokenKind
from tests import factories


class RecordingRuntime:
    """Stands in for the scheduling service: records what the API asked of it."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        engine: AsyncEngine,
    ) -> None:
        self.notified: list[str] = []
        self.woken: list[int] = []
        self.is_leader = False
        self.last_cycle_at = None
        self.last_cycle_error = None
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def notify(self, reason: str) -> None:
        self.notified.append(reason)

    def wake_nodes(self, node_ids: Iterable[int]) -> None:
        self.woken.extend(node_ids)


@asynccontextmanager
async def running_app(
    database_url: str, *, migrate: bool = False, **settings: Any
) -> AsyncIterator[FastAPI]:
    app = create_app(
        Settings(database_url=database_url, migrate_on_start=migrate, **settings),
        runtime_factory=RecordingRuntime,
    )
    async with app.router.lifespan_context(app):
        yield app


def client(app: FastAPI, token: str | None = None, **kw: Any) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, **kw), base_url="http://fairgpu", headers=headers
    )


@dataclass
class World:
    """Two orgs (A, B), a user of every role, an agent credential and a join token."""

    app: FastAPI
    org_a: Org
    org_b: Org
    tokens: dict[str, str] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    node: Node | None = None

    @property
    def runtime(self) -> RecordingRuntime:
        runtime: RecordingRuntime = self.app.state.runtime
        return runtime

    def client(self, who: str | None) -> httpx.AsyncClient:
        return client(self.app, self.tokens[who] if who else None)

    async def job(self, owner: str, **kw: Any) -> Job:
        """A pending job owned by `owner` (a key of `users`), stored directly."""
        user = self.users[owner]
        async with self.app.state.sessionmaker() as session:
            org = await session.get(Org, user.org_id)
            assert org is not None
            row = await factories.job(session, org, user, **kw)
            await session.commit()
            return row


async def seed_world(app: FastAPI) -> World:
    async with app.state.sessionmaker() as session:
        org_a = await factories.org(session, "org-a")
        org_b = await factories.org(session, "org-b")
        world = World(app=app, org_a=org_a, org_b=org_b)
        roles = {
            "member_a": (org_a, Role.MEMBER),
            "member_a2": (org_a, Role.MEMBER),
            "admin_a": (org_a, Role.ORG_ADMIN),
            "member_b": (org_b, Role.MEMBER),
            "admin_b": (org_b, Role.ORG_ADMIN),
        }
        for key, (org, role) in roles.items():
            user = User(name=key.replace("_", "-"), org_id=org.id, role=role)
            session.add(user)
            await session.flush()
            world.users[key] = user
        platform = User(name="root", org_id=None, role=Role.PLATFORM_ADMIN)
        session.add(platform)
        await session.flush()
        world.users["platform"] = platform
        for key, user in world.users.items():
            issued = await issue_token(session, kind=TokenKind.USER, user_id=user.id, ttl_s=3600)
            world.tokens[key] = issued.secret
        node, _ = await factories.node(session, gpus=8)
        world.node = node
        agent = await issue_token(session, kind=TokenKind.AGENT, node_id=node.id)
        world.tokens["agent"] = agent.secret
        join = await issue_token(session, kind=TokenKind.JOIN, uses_left=5)
        world.tokens["join"] = join.secret
        await session.commit()
        return world
