"""The tenant wall in the org tree: a programme's people see the companies under it only in
aggregates (usage by org and GPU type, standing, counts), never their users' names, jobs or
logs; a company's people see its groups in full. Real app over HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Job, Node, Org, Task, UsageRecord, UsageRollup, User
from scheduler.services.tokens import issue_token
from scheduler.states import Role, TokenKind
from tests import factories
from tests.api.helpers import client, running_app

JAN = datetime(2026, 1, 5, 10, tzinfo=UTC)
WINDOW = "since=2026-01-01T00:00:00Z&until=2026-02-01T00:00:00Z&period=month"
PEOPLE = {  # user name: (org, role)
    "prog-admin": ("startups", Role.ORG_ADMIN),
    "prog-member": ("startups", Role.MEMBER),
    "acme-admin": ("acme", Role.ORG_ADMIN),
    "acme-ada": ("acme", Role.MEMBER),
    "vision-vic": ("acme-vision", Role.MEMBER),
    "globex-gus": ("globex", Role.MEMBER),
}
HOURS = {"acme-ada": 3, "vision-vic": 2, "globex-gus": 5}  # GPU-hours each used in January
ROLLED_UP = "vision-vic"  # one of them has a purged job: its hours are in the rollup


@dataclass
class Programme:
    """startups (a programme) > acme (a company) > acme-vision (a group of acme); and globex,
    another company of the programme. Platform admins built it through the API."""

    app: FastAPI
    tokens: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)

    def client(self, who: str) -> httpx.AsyncClient:
        return client(self.app, self.tokens[who])


@pytest.fixture
async def programme(database_url: str) -> AsyncIterator[Programme]:
    async with running_app(database_url) as app:
        world = Programme(app)
        async with app.state.sessionmaker() as session:
            platform = User(name="root", org_id=None, role=Role.PLATFORM_ADMIN)
            session.add(platform)
            await session.flush()
            issued = await issue_token(session, kind=TokenKind.USER, user_id=platform.id)
            world.tokens["platform"] = issued.secret
            await session.commit()
        async with world.client("platform") as c:
            for body in (
                {"name": "startups"},
                {"name": "acme", "parent": "startups"},
                {"name": "acme-vision", "parent": "acme", "tenant": False},
                {"name": "globex", "parent": "startups"},
            ):
                assert (await c.post("/v1/orgs", json=body)).status_code == 201
        async with app.state.sessionmaker() as session:
            node, [gpu, *_] = await factories.node(session, gpus=1)
            for name, (org_name, role) in PEOPLE.items():
                org = await session.scalar(select(Org).where(Org.name == org_name))
                assert org is not None
                user = User(name=name, org_id=org.id, role=role)
                session.add(user)
                await session.flush()
                issued = await issue_token(session, kind=TokenKind.USER, user_id=user.id)
                world.tokens[name] = issued.secret
                if name in HOURS:
                    job = await factories.job(
                        session, org, user, name=f"{name}-secret-model", state=JobState.COMPLETED
                    )
                    world.jobs[name] = job
                    if name == ROLLED_UP:
                        _roll_up(session, job, HOURS[name])
                    else:
                        await _charge(session, job, node, gpu.id, HOURS[name])
            await session.commit()
        yield world


def _roll_up(session: AsyncSession, job: Job, hours: int) -> None:
    """`hours` GPU-hours of January in the rollup of purged jobs."""
    session.add(
        UsageRollup(
            org_id=job.org_id,
            user_id=job.user_id,
            gpu_type="H100",
            period_start=JAN,
            preempted=False,
            gpu_seconds_allocated=hours * 3600.0,
            gpu_seconds_busy=0.0,
            billed_gpu_seconds=hours * 3600.0,
            energy_joules=0.0,
        )
    )


async def _charge(session: AsyncSession, job: Job, node: Node, gpu_id: int, hours: int) -> None:
    """`hours` GPU-hours of January in the ledger, one allocation of the job."""
    task = Task(job_id=job.id, node_rank=0, node_id=node.id, state=JobState.COMPLETED)
    session.add(task)
    await session.flush()
    alloc = Allocation(
        task_id=task.id,
        job_id=job.id,
        org_id=job.org_id,
        user_id=job.user_id,
        gpu_id=gpu_id,
        gpu_type="H100",
        started_at=JAN,
        ended_at=JAN + timedelta(hours=hours),
    )
    session.add(alloc)
    await session.flush()
    for h in range(hours):
        session.add(
            UsageRecord(
                allocation_id=alloc.id,
                org_id=job.org_id,
                user_id=job.user_id,
                job_id=job.id,
                gpu_type="H100",
                period_start=JAN + timedelta(hours=h),
                gpu_seconds_allocated=3600.0,
                gpu_seconds_busy=0.0,
                billed_gpu_seconds=3600.0,
                energy_joules=0.0,
                preempted=False,
            )
        )


async def _usage(c: httpx.AsyncClient, by: str, extra: str = "") -> dict[str, float]:
    response = await c.get(f"/v1/usage?by={by}&{WINDOW}{extra}")
    assert response.status_code == 200, response.text
    return {r["key"]: r["gpu_hours_allocated"] for r in response.json()["data"]}


@pytest.mark.parametrize("who", ["prog-admin", "prog-member"])
async def test_a_programme_sees_its_companies_only_in_aggregates(
    programme: Programme, who: str
) -> None:
    async with programme.client(who) as c:
        by_user = await _usage(c, "user")
        by_user_csv = (await c.get(f"/v1/usage?by=user&{WINDOW}&format=csv")).text
        by_org = await _usage(c, "org")
        by_type = await _usage(c, "gpu_type")
        one_company = await _usage(c, "user", "&org=acme")
        standing = (await c.get("/v1/shares")).json()["data"]
        orgs = (await c.get("/v1/orgs")).json()["data"]
        job = programme.jobs["acme-ada"]
        seen = [
            await c.get(f"/v1/jobs/{job.id}"),
            await c.get(f"/v1/jobs/{job.id}/logs"),
            await c.get(f"/v1/jobs/{job.id}/events"),
            await c.get(f"/v1/jobs/{job.id}/explain"),
            await c.get("/v1/jobs?org=acme"),
        ]
        listed = (await c.get("/v1/jobs")).json()["data"]
    # Each company's people are one line, named by the org, with the same figures.
    assert by_user == {"acme/*": 3.0, "acme-vision/*": 2.0, "globex/*": 5.0}
    assert one_company == {"acme/*": 3.0, "acme-vision/*": 2.0}
    rows = list(csv.DictReader(io.StringIO(by_user_csv)))
    assert sorted(r["key"] for r in rows) == ["acme-vision/*", "acme/*", "globex/*"]
    for person in HOURS:
        assert person not in by_user_csv
    # Counts stay: usage by org and GPU type, standing, the tree.
    assert by_org == {"acme": 3.0, "acme-vision": 2.0, "globex": 5.0}
    assert by_type == {"H100": 10.0}
    assert {s["org"] for s in standing} >= {"acme", "acme-vision", "globex"}
    assert {o["name"]: o["tenant"] for o in orgs} == {
        "startups": True,
        "acme": True,
        "acme-vision": False,
        "globex": True,
    }
    # Jobs, logs and events of a company are its own: 404, as for a job that does not exist.
    assert [r.status_code for r in seen] == [404] * 5
    assert listed == []


async def test_a_company_sees_its_groups_in_full_and_nothing_beside(
    programme: Programme,
) -> None:
    async with programme.client("acme-admin") as c:
        by_user = await _usage(c, "user")
        beside = await c.get(f"/v1/usage?by=user&{WINDOW}&org=globex")
        above = await c.get(f"/v1/usage?by=org&{WINDOW}&org=startups")
    assert by_user == {"acme/acme-ada": 3.0, "acme-vision/vision-vic": 2.0}
    assert (beside.status_code, above.status_code) == (404, 404)
    async with programme.client("vision-vic") as c:
        assert await _usage(c, "user") == {"acme-vision/vision-vic": 2.0}
    async with programme.client("globex-gus") as c:
        assert await _usage(c, "user") == {"globex/globex-gus": 5.0}


async def test_a_groups_admin_sees_neither_its_companys_nor_a_sibling_groups_jobs(
    programme: Programme,
) -> None:
    """A group's org admin administers its group alone: its company's jobs (the company's own
    people's) and a sibling group's are another org's to it, logs, events and reasons
    included, and so are their people in usage (404, as for what does not exist)."""
    async with programme.client("platform") as c:
        made = await c.post(
            "/v1/orgs", json={"name": "acme-nlp", "parent": "acme", "tenant": False}
        )
        assert made.status_code == 201, made.text
    async with programme.app.state.sessionmaker() as session:
        orgs = {o.name: o for o in (await session.scalars(select(Org))).all()}
        for name, org, role in (
            ("vision-admin", "acme-vision", Role.ORG_ADMIN),
            ("nlp-nia", "acme-nlp", Role.MEMBER),
        ):
            user = User(name=name, org_id=orgs[org].id, role=role)
            session.add(user)
            await session.flush()
            issued = await issue_token(session, kind=TokenKind.USER, user_id=user.id)
            programme.tokens[name] = issued.secret
            if name == "nlp-nia":
                sibling = await factories.job(
                    session, orgs[org], user, name="nlp-secret-model", state=JobState.RUNNING
                )
        await session.commit()
    others = {"company": programme.jobs["acme-ada"].id, "sibling": sibling.id}
    own = programme.jobs["vision-vic"].id
    async with programme.client("vision-admin") as c:
        for job_id in others.values():
            for path in ("", "/logs", "/events", "/explain"):
                response = await c.get(f"/v1/jobs/{job_id}{path}")
                assert response.status_code == 404, (job_id, path, response.text)
            for action in ("cancel", "hold", "release"):
                response = await c.post(f"/v1/jobs/{job_id}/{action}")
                assert response.status_code == 404, (job_id, action, response.text)
            patched = await c.patch(f"/v1/jobs/{job_id}", json={"priority": 1})
            assert patched.status_code in (404, 422), patched.text
        for org in ("acme", "acme-nlp", "startups"):
            assert (await c.get(f"/v1/jobs?org={org}")).status_code == 404, org
            usage = await c.get(f"/v1/usage?by=user&{WINDOW}&org={org}")
            assert usage.status_code == 404, (org, usage.text)
        listed = [j["id"] for j in (await c.get("/v1/jobs")).json()["data"]]
        mine = await c.get(f"/v1/jobs/{own}/events")
        by_user = await _usage(c, "user")
    assert listed == [own]
    assert mine.status_code == 200, mine.text
    assert by_user == {"acme-vision/vision-vic": 2.0}


async def test_platform_admins_set_the_wall_and_see_everyone(programme: Programme) -> None:
    async with programme.client("platform") as c:
        assert await _usage(c, "user") == {
            "acme/acme-ada": 3.0,
            "acme-vision/vision-vic": 2.0,
            "globex/globex-gus": 5.0,
        }
        walled = await c.patch("/v1/orgs/acme-vision", json={"tenant": True})
        bad = await c.patch("/v1/orgs/acme-vision", json={"tenant": "perhaps"})
    assert (walled.status_code, walled.json()["tenant"]) == (200, True)
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    async with programme.client("acme-admin") as c:
        # acme-vision is now a tenant of its own: acme sees it as a line, not its people.
        assert await _usage(c, "user") == {"acme/acme-ada": 3.0, "acme-vision/*": 2.0}
        refused = await c.patch("/v1/orgs/acme-vision", json={"tenant": False})
    assert refused.status_code == 403
    async with programme.client("platform") as c:
        assert (await c.patch("/v1/orgs/acme-vision", json={"tenant": False})).status_code == 200
        events = (await c.get("/v1/orgs/acme-vision")).json()
    assert events["tenant"] is False
    async with programme.client("acme-admin") as c:
        assert await _usage(c, "user") == {"acme/acme-ada": 3.0, "acme-vision/vision-vic": 2.0}


SETTINGS = (
    "default_time_limit_s",
    "require_isolation",
    "isolation_required",
    "require_private_network",
    "private_network_required",
    "image_patterns",
    "max_priority_class",
    "max_pending_jobs",
    "interactive_max_time_s",
    "interactive_idle_timeout_s",
)
ACME_SETTINGS = {
    "image_patterns": ["registry.acme.internal/secret-model-*"],
    "require_isolation": True,
    "max_priority_class": "high",
    "max_pending_jobs": 7,
    "default_time_limit": 7200,
    "interactive_max_time": 1800,
}


async def _configure_acme(programme: Programme) -> None:
    async with programme.client("platform") as c:
        for org in ("acme", "acme-vision"):
            response = await c.patch(f"/v1/orgs/{org}", json=ACME_SETTINGS)
            assert response.status_code == 200, response.text
        for org in ("startups", "acme"):
            quota = await c.put(f"/v1/orgs/{org}/quota/H100", json={"guaranteed": 4, "limit": 8})
            assert quota.status_code == 200, quota.text


async def _orgs(programme: Programme, who: str) -> dict[str, dict[str, object]]:
    async with programme.client(who) as c:
        listed = {o["name"]: o for o in (await c.get("/v1/orgs")).json()["data"]}
        for name in listed:
            one = await c.get(f"/v1/orgs/{name}")
            assert one.json() == listed[name], name
    return listed


@pytest.mark.parametrize("who", ["prog-admin", "prog-member"])
async def test_a_programme_sees_its_companies_settings_not(programme: Programme, who: str) -> None:
    """Past the wall, an org's name, place, shares and quotas (what sharing a pool needs);
    its image patterns, isolation, network, priority, pending and interactive settings are
    its company's own: null, with `settings_hidden`."""
    await _configure_acme(programme)
    orgs = await _orgs(programme, who)
    for company in ("acme", "acme-vision", "globex"):
        org = orgs[company]
        assert org["settings_hidden"] is True
        assert {key: org[key] for key in SETTINGS} == dict.fromkeys(SETTINGS)
        assert org["parent_id"] is not None
        assert org["shares"] == 1.0
    assert orgs["acme"]["quotas"] == [{"gpu_type": "H100", "guaranteed": 4, "limit": 8}]
    assert orgs["acme"]["path"] == "startups/acme"
    assert orgs["startups"]["settings_hidden"] is False  # its own
    assert orgs["startups"]["image_patterns"] == []
    async with programme.client(who) as c:
        assert "secret-model" not in (await c.get("/v1/orgs")).text


@pytest.mark.parametrize("who", ["acme-admin", "acme-ada", "vision-vic", "platform"])
async def test_a_company_and_platform_admins_see_its_settings(
    programme: Programme, who: str
) -> None:
    await _configure_acme(programme)
    orgs = await _orgs(programme, who)
    seen = {"acme", "acme-vision"} & set(orgs)
    assert seen == ({"acme-vision"} if who == "vision-vic" else {"acme", "acme-vision"})
    for name in seen:
        org = orgs[name]
        assert org["settings_hidden"] is False
        assert org["image_patterns"] == ACME_SETTINGS["image_patterns"]
        assert (org["require_isolation"], org["max_priority_class"]) == (True, "high")
        assert (org["max_pending_jobs"], org["default_time_limit_s"]) == (7, 7200)
        assert org["interactive_max_time_s"] == 1800
    if who == "platform":
        assert not any(o["settings_hidden"] for o in orgs.values())
