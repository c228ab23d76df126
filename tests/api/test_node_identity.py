"""Node identity over HTTP: takeover refused, approve, credential renewal and expiry, revoke,
delete, join token defaults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from scheduler.db import ApiToken, Event, Gpu, Node
from scheduler.db.types import utcnow
from scheduler.services.invariants import check_invariants
from scheduler.states import TokenKind
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


async def test_a_join_token_never_takes_over_a_node(cluster: Cluster) -> None:
    join = await cluster.join_token()
    first = await cluster.register(join, name="gpu-a", gpus=2)
    refused = await cluster.http.post(
        "/v1/agent/register",
        json=_body("gpu-a"),
        headers={"Authorization": f"Bearer {join}"},
    )
    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "fairgpu node approve gpu-a" in refused.json()["detail"]
    await cluster.heartbeat(first["credential"])  # the node's own credential still works

    # The node's own credential re-registers it and rotates it.
    again = await cluster.register(first["credential"], name="gpu-a", gpus=2)
    assert again["node_id"] == first["node_id"]
    await cluster.call("POST", "/v1/agent/heartbeat", first["credential"], {}, expect=401)
    await cluster.heartbeat(again["credential"])
    # ...but not another node.
    await cluster.call(
        "POST", "/v1/agent/register", again["credential"], _body("gpu-b"), expect=403
    )

    # An operator approves one takeover: the next join-token registration gets the node.
    await cluster.call("POST", f"/v1/nodes/{first['node_id']}/approve", cluster.admin)
    taken = await cluster.register(join, name="gpu-a", gpus=2)
    assert taken["node_id"] == first["node_id"]
    await cluster.call("POST", "/v1/agent/heartbeat", again["credential"], {}, expect=401)
    await cluster.heartbeat(taken["credential"])
    await cluster.call(  # the approval was used up
        "POST", "/v1/agent/register", join, _body("gpu-a"), expect=409
    )


async def test_join_tokens_default_to_one_use_and_one_day(cluster: Cluster) -> None:
    created = await cluster.call("POST", "/v1/join-tokens", cluster.admin, {"name": "j"})
    async with cluster.sessionmaker() as session:
        row = await session.get(ApiToken, created["id"])
        assert row is not None
        assert row.uses_left == 1
        assert row.expires_at is not None
        left_s = (row.expires_at - utcnow()).total_seconds()
        assert 86_400 - 60 < left_s <= 86_400
    await cluster.register(created["token"], name="one")
    await cluster.call("POST", "/v1/agent/register", created["token"], _body("two"), expect=401)
    expired = await cluster.call("POST", "/v1/join-tokens", cluster.admin, {"name": "e"})
    async with cluster.sessionmaker() as session:
        await session.execute(
            update(ApiToken)
            .where(ApiToken.id == expired["id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    await cluster.call("POST", "/v1/agent/register", expired["token"], _body("three"), expect=401)


async def test_credentials_expire_and_heartbeats_renew_them(database_url: str) -> None:
    settings = fast_settings(database_url, node_credential_ttl_s=1000)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), name="renew")
        old = node["credential"]
        # Fresh: kept, and the field is left out (older agents refuse unknown fields).
        assert "credential" not in await cluster.heartbeat(old)
        await _age(cluster, old, left_s=400)  # less than half left
        reply = await cluster.heartbeat(old, wait_s=5)  # not held: it carries the credential
        new = reply["credential"]
        assert new
        assert new != old
        # The reply was lost, say: the old one still works, and the retry renews again (the
        # first new one is then dropped: only the latest is handed out).
        newer = (await cluster.heartbeat(old))["credential"]
        await cluster.call("POST", "/v1/agent/heartbeat", new, {}, expect=401)
        new = newer
        assert (await cluster.heartbeat(new)).get("credential") is None
        await cluster.call("POST", "/v1/agent/heartbeat", old, {}, expect=401)
        async with cluster.sessionmaker() as session:
            row = await session.scalar(
                select(ApiToken).where(
                    ApiToken.node_id == node["node_id"], ApiToken.revoked_at.is_(None)
                )
            )
            assert row is not None
            assert row.expires_at is not None
            assert 990 < (row.expires_at - utcnow()).total_seconds() <= 1000
        await _age(cluster, new, left_s=-1)  # expired
        await cluster.call("POST", "/v1/agent/heartbeat", new, {}, expect=401)


async def test_revoke_ends_held_heartbeats_and_fails_the_tasks(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=2)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=2)
    cred = node["credential"]
    keep = await cluster.submit(token, gpus_per_node=1, preemptible=True)
    lose = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    specs = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(
        cred, tasks=[report(s["task_id"], s["job_id"], "running") for s in specs]
    )
    held = asyncio.create_task(
        cluster.http.post(
            "/v1/agent/heartbeat", json={"wait_s": 30}, headers={"Authorization": f"Bearer {cred}"}
        )
    )
    await asyncio.sleep(0.3)
    assert not held.done()
    revoked = await cluster.call("POST", f"/v1/nodes/{node['node_id']}/revoke", cluster.admin)
    assert revoked["state"] == "down"
    response = await asyncio.wait_for(held, 3)
    assert response.status_code == 401, response.text
    await cluster.call("POST", "/v1/agent/heartbeat", cred, {}, expect=401)
    assert (await cluster.job(token, lose["id"]))["state"] == "NODE_FAIL"
    requeued = await cluster.job(token, keep["id"])
    assert requeued["state"] == "PENDING"
    assert requeued["requeue_count"] == 1
    async with cluster.sessionmaker() as session:
        invariants = await check_invariants(session)
    assert invariants.ok, invariants.violations
    # The node returns only by an approved takeover.
    await cluster.call(
        "POST",
        "/v1/agent/register",
        await cluster.join_token(),
        _body(node["node_name"]),
        expect=409,
    )


async def test_delete_removes_an_idle_node_and_keeps_history(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=1)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=1)
    cred = node["credential"]
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "running")])
    path = f"/v1/nodes/{node['node_id']}"
    await cluster.call("POST", f"{path}/drain", cluster.admin, {})
    await cluster.call("DELETE", path, cluster.admin, expect=409)  # still runs a task
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "exited", exit_code=0)])
    await cluster.cycle()
    await cluster.call("DELETE", path, cluster.admin, expect=204)
    await cluster.call("GET", path, cluster.admin, expect=404)
    await cluster.call("POST", "/v1/agent/heartbeat", cred, {}, expect=401)
    assert (await cluster.job(token, job["id"]))["state"] == "COMPLETED"
    async with cluster.sessionmaker() as session:
        assert await session.scalar(select(Node).where(Node.id == node["node_id"])) is None
        assert await session.scalar(select(Gpu).where(Gpu.node_id == node["node_id"])) is None
        kept = await session.scalar(
            select(Event.id).where(Event.kind == "node.register", Event.node_id.is_(None))
        )
        assert kept is not None
        invariants = await check_invariants(session)
    assert invariants.ok, invariants.violations
    # The name is free again: a join token registers a new node under it.
    again = await cluster.register(await cluster.join_token(), name=node["node_name"], gpus=1)
    await cluster.heartbeat(again["credential"])
    await cluster.call("POST", "/v1/agent/heartbeat", cred, {}, expect=401)


def _body(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "site": "dc1",
        "domain": "rack1",
        "hostname": name,
        "address": "10.0.0.9",
        "agent_version": "test",
        "gpus": [],
    }


async def test_a_held_heartbeat_returns_when_its_credential_needs_renewing(
    database_url: str,
) -> None:
    """A quiet heartbeat is held up to the long poll; one that arrived just before its
    credential needed renewing was held past that, and with a lifetime whose half is shorter
    than the long poll past the credential's end: the agent's next heartbeat was refused and the
    agent stopped (CI: test_agent_real's "never renewed"). Now the hold ends when renewal is
    due, and the next heartbeat renews."""
    settings = fast_settings(database_url, node_credential_ttl_s=1000, heartbeat_long_poll_s=5.0)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), name="held")
        credential = node["credential"]
        await cluster.heartbeat(credential)  # the node's GPUs known: the next one is quiet
        await _age(cluster, credential, left_s=500.5)  # renewal due in half a second
        began = asyncio.get_running_loop().time()
        reply = await cluster.heartbeat(credential, wait_s=5)
        held_s = asyncio.get_running_loop().time() - began
        assert "credential" not in reply
        assert held_s < 3.0, held_s  # not the whole 5 s
        renewed = await cluster.heartbeat(credential, wait_s=5)
        assert renewed["credential"], renewed


async def _age(cluster: Cluster, credential: str, *, left_s: float) -> None:
    from scheduler.services.tokens import hash_token

    async with cluster.sessionmaker() as session:
        await session.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(credential), ApiToken.kind == TokenKind.AGENT)
            .values(expires_at=utcnow() + timedelta(seconds=left_s))
        )
        await session.commit()
    cluster.app.state.auth_cache.clear()
