"""What a member sees of other orgs (#14): allocated GPUs and "a job of another org", no ids;
/metrics closed by its own token, and without one to all but the server's own machine."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select

from protocol.states import JobState
from scheduler.db import Gpu, Job
from tests import factories
from tests.api.helpers import World, client, running_app, seed_world
from tests.scheduling.harness import fast_settings, running_cluster


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_app(database_url) as app:
        yield await seed_world(app)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _run_on_node(world: World, owner: str, gpu_indices: list[int]) -> Job:
    job = await world.job(owner, state=JobState.RUNNING)
    async with world.app.state.sessionmaker() as session:
        assert world.node is not None
        gpus = (
            await session.scalars(
                select(Gpu).where(Gpu.node_id == world.node.id, Gpu.index.in_(gpu_indices))
            )
        ).all()
        for gpu in gpus:
            gpu.last_sample = {"utilization_ratio": 0.5, "processes": [{"pid": 4242}]}
        row = await session.get(Job, job.id)
        assert row is not None
        await factories.running_task(session, row, world.node, list(gpus))
        await session.commit()
    return job


async def test_members_see_other_orgs_jobs_on_a_node_only_as_allocated_gpus(world: World) -> None:
    ours = await _run_on_node(world, "member_a", [0, 1])
    theirs = await _run_on_node(world, "member_b", [2])
    async with world.client("member_a") as c:
        [node] = (await c.get("/v1/nodes")).json()["data"]
    gpus = {g["index"]: g for g in node["gpus"]}
    assert (gpus[0]["allocated"], gpus[0]["allocated_job_id"]) == (True, ours.id)
    assert gpus[0]["last_sample"]["processes"] == [{"pid": 4242}]
    assert (gpus[2]["allocated"], gpus[2]["allocated_job_id"]) == (True, None)
    # Nor how it uses the GPU: utilisation, memory, power over time are the rival's training
    # (its model's size, its progress), not a count.
    assert gpus[2]["last_sample"] is None
    assert gpus[0]["last_sample"]["utilization_ratio"] == 0.5
    assert (gpus[3]["allocated"], gpus[3]["allocated_job_id"]) == (False, None)
    assert node["gpus_allocated"] == 3
    async with world.client("member_a") as c:
        one = (await c.get(f"/v1/nodes/{node['id']}")).json()
    assert {g["index"]: g["last_sample"] for g in one["gpus"]}[2] is None
    async with world.client("platform") as c:
        [node] = (await c.get("/v1/nodes")).json()["data"]
    assert {g["index"]: g["allocated_job_id"] for g in node["gpus"]}[2] == theirs.id
    assert {g["index"]: g["last_sample"] for g in node["gpus"]}[2]["utilization_ratio"] == 0.5


async def test_reasons_name_other_orgs_jobs_without_their_ids(world: World) -> None:
    theirs = await world.job("member_b", name="secret-project")
    mine_first = await world.job("member_a2")
    reasons = [
        {
            "code": "Reservation",
            "message": f"H100 GPUs it could use are reserved for job {theirs.id}",
            "details": {"reserved_for_job_id": theirs.id, "gpu_type": "H100"},
        },
        {
            "code": "Priority",
            "message": f"strict order: behind job {mine_first.id}, which cannot start yet",
            "details": {"behind_job_id": mine_first.id},
        },
        {
            "code": "Preempting",
            "message": "waiting for GPUs of 2 job(s) being preempted for it",
            "details": {"victim_job_ids": f"{mine_first.id},{theirs.id}"},
        },
    ]
    waiting = await world.job("member_a", pending_reasons=reasons)
    async with world.client("member_a") as c:
        explained = (await c.get(f"/v1/jobs/{waiting.id}/explain")).json()
        listed = (await c.get("/v1/jobs")).json()["data"]
    reserved, behind, preempting = explained["reasons"]
    assert reserved["message"] == "H100 GPUs it could use are reserved for a job of another org"
    assert reserved["details"] == {"reserved_for_other_org": True, "gpu_type": "H100"}
    # A job of the caller's own org keeps its id.
    assert behind["details"] == {"behind_job_id": mine_first.id}
    assert f"job {mine_first.id}" in behind["message"]
    assert preempting["details"] == {
        "victim_job_ids": str(mine_first.id),
        "victims_of_other_orgs": 1,
    }
    assert not re.search(rf"\bjob {theirs.id}\b", str(explained["reasons"]))
    assert "secret-project" not in str(explained)
    [row] = [j for j in listed if j["id"] == waiting.id]
    assert row["pending_reason"]["message"].endswith("reserved for a job of another org")
    async with world.client("platform") as c:
        explained = (await c.get(f"/v1/jobs/{waiting.id}/explain")).json()
    assert explained["reasons"][0]["details"]["reserved_for_job_id"] == theirs.id


async def test_metrics_ask_for_their_token_when_one_is_set(database_url: str) -> None:
    settings = fast_settings(database_url, metrics_token="prom-scrape-secret")
    async with running_cluster(settings) as cluster:
        anonymous = await cluster.http.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.headers["content-type"].startswith("application/problem+json")
        as_admin = await cluster.http.get("/metrics", headers=bearer(cluster.admin))
        assert as_admin.status_code == 401  # a user token, even an admin's, is not the one
        scraped = await cluster.http.get("/metrics", headers=bearer("prom-scrape-secret"))
        assert scraped.status_code == 200
        assert "fairgpu_" in scraped.text


async def test_metrics_without_a_token_answer_only_this_machine(database_url: str) -> None:
    """Without FAIRGPU_METRICS_TOKEN, /metrics (every org's name, jobs, quota and allocation)
    was open to every client that reached the server; now only to the server's own machine,
    and a client elsewhere that keeps asking is slowed like one guessing tokens."""
    settings = fast_settings(database_url, auth_failure_burst=3, auth_failure_rate_per_s=0.001)
    async with running_cluster(settings) as cluster:
        local = await cluster.http.get("/metrics")  # ASGITransport's peer: 127.0.0.1
        assert local.status_code == 200
        assert "fairgpu_" in local.text
        proxied = await cluster.http.get("/metrics", headers={"X-Forwarded-For": "192.0.2.9"})
        assert proxied.status_code == 401  # a proxy on this machine relayed someone else
        remote = httpx.ASGITransport(app=cluster.app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=remote, base_url="http://fairgpu") as elsewhere:
            refused = await elsewhere.get("/metrics")
            assert refused.status_code == 401
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "FAIRGPU_METRICS_TOKEN" in refused.json()["detail"]
            assert "fairgpu_" not in refused.text
            as_admin = await elsewhere.get("/metrics", headers=bearer(cluster.admin))
            assert as_admin.status_code == 401  # a user token, even an admin's, never opens it
            statuses = [(await elsewhere.get("/metrics")).status_code for _ in range(3)]
            assert statuses[-1] == 429, statuses
        assert (await cluster.http.get("/metrics")).status_code == 200  # this machine is not slowed


async def test_an_org_admin_cannot_probe_other_orgs_names_by_creating_users(
    world: World,
) -> None:
    """Another org's name and a name no org has get the same refusal: which companies share
    the pool is not for a tenant to learn one guess at a time."""
    answers = []
    async with world.client("admin_a") as c:
        for org in ("org-b", "no-such-org", str(world.org_b.id), "999999"):
            r = await c.post("/v1/users", json={"name": "probe", "org": org, "role": "member"})
            answers.append((r.status_code, r.json()["detail"].replace(repr(org), "ORG")))
        own = await c.post("/v1/users", json={"name": "mine", "org": "org-a", "role": "member"})
    assert own.status_code == 201, own.text
    assert len(set(answers)) == 1, answers
    assert answers[0][0] == 403


@pytest.mark.parametrize("who", ["member_a", "admin_a"])
async def test_revoking_another_orgs_token_reads_as_a_token_that_does_not_exist(
    world: World, who: str
) -> None:
    """Another org's token id gets the answer of an id no token has: not 'user N not found',
    which told that the id is a token and whose it is (a walk over token ids listed every
    user of every org and how many tokens each held). The token stays live."""
    async with world.client("member_b") as c:
        theirs = (await c.post("/v1/tokens", json={"name": "theirs"})).json()
    missing = theirs["id"] + 1000
    async with world.client(who) as c:
        hidden = await c.delete(f"/v1/tokens/{theirs['id']}")
        absent = await c.delete(f"/v1/tokens/{missing}")
    assert hidden.status_code == absent.status_code == 404, hidden.text
    assert hidden.json()["detail"] == f"token {theirs['id']} not found"
    assert absent.json()["detail"] == f"token {missing} not found"
    async with client(world.app, theirs["token"]) as c:
        assert (await c.get("/v1/users/me")).status_code == 200


async def test_a_client_sharing_prometheus_address_cannot_lock_it_out(database_url: str) -> None:
    """Refused scrapes drain their address's bucket of failed authentications, and past it
    the address's requests with a bearer this process has not seen work are 429 before any
    check. The metrics token that scraped here is seen to work, as a user's token that
    authenticated is: a client behind Prometheus' NAT that floods /metrics slows itself."""
    settings = fast_settings(
        database_url,
        metrics_token="prom-scrape-secret",
        auth_failure_burst=2,
        auth_failure_rate_per_s=0.001,
    )
    async with running_cluster(settings) as cluster:
        shared = httpx.ASGITransport(app=cluster.app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=shared, base_url="http://fairgpu") as nat:
            prometheus = bearer("prom-scrape-secret")
            assert (await nat.get("/metrics", headers=prometheus)).status_code == 200
            flood = [(await nat.get("/metrics")).status_code for _ in range(3)]
            assert flood == [401, 401, 429]
            assert (await nat.get("/metrics", headers=bearer("guess"))).status_code == 429
            assert (await nat.get("/metrics", headers=prometheus)).status_code == 200
