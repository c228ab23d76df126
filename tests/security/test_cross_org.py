"""What one org can learn of, or do to, another org's jobs through its own jobs.

Dependencies, idempotency keys and preemption all name jobs; none may let a member of org B hold
on, learn the state of, or collide with a job of org A.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from scheduler.db import Job
from tests.api.helpers import World, running_app, seed_world
from tests.scheduling.harness import fast_settings, report, running_cluster

JOB = {"command": ["python", "train.py"], "gpus_per_node": 1, "time_limit": 60}


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)


async def _jobs_of_org(world: World, org_id: int) -> int:
    async with world.app.state.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).where(Job.org_id == org_id)) or 0)


@pytest.mark.parametrize(
    "shape",
    [
        {"depends_on": ["{id}"]},
        {"dependency": "afterok:{id}"},
        {"dependency": "afterany:{id}"},
        {"dependency": "afternotok:{id}"},
        {"dependency": "afterany:{id}", "array": "0-3"},
    ],
)
async def test_another_orgs_job_cannot_be_a_dependency(world: World, shape: dict[str, Any]) -> None:
    """Org B may not wait on org A's job: it would learn how A's job ends (afterok against
    afternotok) and when. The answer is the one for a job that does not exist."""
    theirs = await world.job("member_a")
    missing = theirs.id + 10_000

    def body(job_id: int) -> dict[str, Any]:
        filled = {
            k: [job_id] if k == "depends_on" else str(v).replace("{id}", str(job_id))
            for k, v in shape.items()
        }
        return {**JOB, **filled}

    before = await _jobs_of_org(world, world.org_b.id)
    async with world.client("member_b") as c:
        hidden = await c.post("/v1/jobs", json=body(theirs.id))
        absent = await c.post("/v1/jobs", json=body(missing))
    assert hidden.status_code == absent.status_code == 422, hidden.text
    assert hidden.json()["detail"].replace(str(theirs.id), "N") == absent.json()["detail"].replace(
        str(missing), "N"
    )
    assert await _jobs_of_org(world, world.org_b.id) == before


async def test_idempotency_keys_are_each_users_own(world: World) -> None:
    """The same key from users of two orgs (and from two users of one org) stores one job each;
    each user's retry returns that user's own job."""
    seen: dict[str, int] = {}
    for who in ("member_a", "member_b", "member_a2"):
        async with world.client(who) as c:
            await c.get("/v1/users/me")  # the token is now known: the direct route may answer
            headers = {"Idempotency-Key": "nightly-run"}
            first = await c.post("/v1/jobs", json={**JOB, "name": who}, headers=headers)
            again = await c.post("/v1/jobs", json={**JOB, "name": "other"}, headers=headers)
        assert (first.status_code, again.status_code) == (201, 200), (who, first.text)
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["name"] == who
        seen[who] = first.json()["id"]
    assert len(set(seen.values())) == 3


def _mentions(text: str, job_id: int) -> bool:
    return re.search(rf"\bjob {job_id}\b|\"preemptor_job_id\":\s*{job_id}\b", text) is not None


async def test_a_preempted_job_does_not_name_the_other_orgs_preemptor(database_url: str) -> None:
    """A reclaim preempts org A's borrowed job for org B's: A's members read in its events,
    its reasons and its listing that a job of another org took the GPUs, never which one."""
    async with running_cluster(fast_settings(database_url)) as cluster:
        borrower = await cluster.user_token(await cluster.org(guaranteed=0, limit=8))
        owner = await cluster.user_token(await cluster.org(guaranteed=8, limit=8))
        node = await cluster.register(await cluster.join_token(), gpus=8)
        cred = node["credential"]
        lent = await cluster.submit(borrower, gpus_per_node=8, preemptible=True)
        await cluster.cycle()
        (spec,) = (await cluster.heartbeat(cred))["start"]
        await cluster.heartbeat(cred, tasks=[report(spec["task_id"], lent["id"], "running")])
        wanted = await cluster.submit(owner, gpus_per_node=8)
        await cluster.cycle()
        stops = (await cluster.heartbeat(cred))["stop"]
        assert [s["task_id"] for s in stops] == [spec["task_id"]]
        await cluster.heartbeat(
            cred, tasks=[report(spec["task_id"], lent["id"], "stopped", signal=15)]
        )
        await cluster.cycle()
        texts = [
            (await cluster.http.get(path, headers={"Authorization": f"Bearer {borrower}"})).text
            for path in (
                f"/v1/jobs/{lent['id']}/events",
                f"/v1/jobs/{lent['id']}",
                f"/v1/jobs/{lent['id']}/explain",
                "/v1/jobs",
            )
        ]
        admin_events = await cluster.call("GET", f"/v1/jobs/{lent['id']}/events", cluster.admin)
    preempt = [e for e in admin_events["data"] if e["kind"] == "job.preempt"]
    assert preempt
    assert preempt[0]["details"]["preemptor_job_id"] == wanted["id"]  # platform admins see it
    assert "another org" in texts[0]
    for text in texts:
        assert not _mentions(text, wanted["id"]), text
