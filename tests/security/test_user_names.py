"""User names are unique per org (and among platform admins), not over the whole server: a
company creating `jane` learns nothing of another company's `jane`, nor is kept from the name,
and every lookup by name stays within the caller's org. Real app over HTTP, SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from scheduler.db import Org, User
from scheduler.services.auth import bootstrap_admin
from scheduler.services.tokens import issue_token
from scheduler.states import Role, TokenKind
from tests import factories
from tests.api.helpers import client, running_app

COMPANIES = ("acme", "globex")


@dataclass
class Pool:
    """Two companies, each with an org admin; a platform admin `root` made them."""

    app: FastAPI
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, who: str) -> httpx.AsyncClient:
        return client(self.app, self.tokens[who])


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    async with running_app(database_url) as app:
        world = Pool(app)
        async with app.state.sessionmaker() as session:
            root = User(name="root", org_id=None, role=Role.PLATFORM_ADMIN)
            session.add(root)
            await session.flush()
            world.tokens["root"] = (
                await issue_token(session, kind=TokenKind.USER, user_id=root.id)
            ).secret
            await session.commit()
        async with world.client("root") as c:
            for company in COMPANIES:
                assert (await c.post("/v1/orgs", json={"name": company})).status_code == 201
                admin = await c.post(
                    "/v1/users",
                    json={"name": f"{company}-admin", "org": company, "role": "org-admin"},
                )
                assert admin.status_code == 201, admin.text
                token = await c.post("/v1/tokens", json={"user_id": admin.json()["id"]})
                world.tokens[company] = token.json()["token"]
        yield world


async def _jane(pool: Pool, company: str) -> httpx.Response:
    async with pool.client(company) as c:
        return await c.post("/v1/users", json={"name": "jane", "role": "member"})


async def _job_of_each_jane(pool: Pool) -> dict[str, int]:
    """A job of each company's jane, by company."""
    jobs = {}
    async with pool.app.state.sessionmaker() as session:
        for company in COMPANIES:
            org = await session.scalar(select(Org).where(Org.name == company))
            assert org is not None
            jane = await session.scalar(
                select(User).where(User.org_id == org.id, User.name == "jane")
            )
            assert jane is not None
            jobs[company] = (await factories.job(session, org, jane, name=f"{company}-run")).id
        await session.commit()
    return jobs


async def test_two_companies_each_have_a_jane_and_see_only_theirs(pool: Pool) -> None:
    created = {company: await _jane(pool, company) for company in COMPANIES}
    assert [r.status_code for r in created.values()] == [201, 201]
    again = await _jane(pool, "acme")
    assert again.status_code == 409
    assert again.json()["detail"] == "user 'jane' already exists in this org"
    for company in COMPANIES:
        async with pool.client(company) as c:
            listed = (await c.get("/v1/users")).json()["data"]
        assert {u["name"]: u["id"] for u in listed} == {
            f"{company}-admin": listed[0]["id"],
            "jane": created[company].json()["id"],
        }
    async with pool.client("root") as c:
        everyone = (await c.get("/v1/users")).json()["data"]
    assert sorted(u["name"] for u in everyone if u["name"] == "jane") == ["jane", "jane"]


async def test_a_refused_name_tells_nothing_of_other_orgs(pool: Pool) -> None:
    """Only the caller's own org's names refuse: a name another company holds, or a
    platform admin's, is free."""
    async with pool.client("globex") as c:
        for name in ("acme-admin", "root"):
            response = await c.post("/v1/users", json={"name": name, "role": "member"})
            assert response.status_code == 201, response.text
    async with pool.client("root") as c:
        admin = await c.post("/v1/users", json={"name": "acme-admin", "role": "platform-admin"})
        twice = await c.post("/v1/users", json={"name": "root", "role": "platform-admin"})
    assert admin.status_code == 201
    assert twice.status_code == 409
    assert twice.json()["detail"] == "user 'root' already exists among platform admins"


async def test_the_jobs_list_names_users_within_the_callers_org(pool: Pool) -> None:
    for company in COMPANIES:
        assert (await _jane(pool, company)).status_code == 201
    jobs = await _job_of_each_jane(pool)
    for company in COMPANIES:
        async with pool.client(company) as c:
            listed = (await c.get("/v1/jobs?user=jane")).json()["data"]
        assert [(j["id"], j["org_name"], j["user_name"]) for j in listed] == [
            (jobs[company], company, "jane")
        ]
    async with pool.client("root") as c:
        ambiguous = await c.get("/v1/jobs?user=jane")
        in_globex = (await c.get("/v1/jobs?user=jane&org=globex")).json()["data"]
        nobody = (await c.get("/v1/jobs?user=acme-admin&org=globex")).json()["data"]
    assert ambiguous.status_code == 422
    assert ambiguous.headers["content-type"].startswith("application/problem+json")
    assert "give `org`" in ambiguous.json()["detail"]
    assert [j["id"] for j in in_globex] == [jobs["globex"]]
    assert nobody == []


async def test_bootstrap_finds_its_platform_admin_not_an_orgs_user(pool: Pool) -> None:
    """`fairgpu admin bootstrap --force` with a name an org's user also has: the platform
    admin of that name, made once and reused; the org's user stays as it was."""
    assert (await _jane(pool, "acme")).status_code == 201
    async with pool.app.state.sessionmaker() as session:
        first = await bootstrap_admin(session, name="jane", ttl_s=3600, force=True)
        await session.commit()
    async with pool.app.state.sessionmaker() as session:
        second = await bootstrap_admin(session, name="jane", ttl_s=3600, force=True)
        await session.commit()
    ids = set()
    for issued in (first, second):
        async with client(pool.app, issued.secret) as c:
            me = (await c.get("/v1/users/me")).json()
        assert (me["name"], me["org_id"], me["role"]) == ("jane", None, "platform-admin")
        ids.add(me["id"])
    assert len(ids) == 1
    async with pool.client("acme") as c:
        [acme_jane] = [u for u in (await c.get("/v1/users")).json()["data"] if u["name"] == "jane"]
    assert acme_jane["role"] == "member"
    assert acme_jane["id"] not in ids
