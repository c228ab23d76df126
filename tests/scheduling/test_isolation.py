"""Tenant isolation, server side (#13), through the real app over HTTP on both databases.

Nodes report how their agent confines tasks; orgs may require strict isolation (inherited by the
orgs below them) and restrict images; jobs carry a memory request and a secret to their tasks;
a task the agent refuses ends its job FAILED with the agent's reason.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from sqlalchemy import select

from scheduler.db import Event
from scheduler.metrics import PROCESS_REGISTRY
from tests.scheduling.harness import Cluster, report

_names = itertools.count(1)
REFUSED = "workdir /etc is outside the data roots allowed to org acme (/data/acme)"


async def _register(cluster: Cluster, isolation: str | None, gpus: int = 8) -> dict[str, Any]:
    """A node registered over HTTP, saying `isolation` (None: an agent that does not say)."""
    join = await cluster.join_token()
    name = f"iso-node{next(_names)}"
    body: dict[str, Any] = {
        "name": name,
        "site": "dc1",
        "domain": "rack1",
        "hostname": name,
        "address": "10.1.0.1",
        "agent_version": "test",
        "gpus": [
            {"index": i, "uuid": f"GPU-{name}-{i}", "model": "H100", "memory_bytes": 80 << 30}
            for i in range(gpus)
        ],
    }
    if isolation is not None:
        body["isolation"] = isolation
    node: dict[str, Any] = await cluster.call("POST", "/v1/agent/register", join, body)
    return node


async def _isolation_of(cluster: Cluster, node_id: int) -> str:
    nodes = await cluster.call("GET", "/v1/nodes", cluster.admin)
    (node,) = [n for n in nodes["data"] if n["id"] == node_id]
    return str(node["isolation"])


async def test_node_isolation_from_registration_and_heartbeats(cluster: Cluster) -> None:
    silent = await _register(cluster, None)
    strict = await _register(cluster, "strict")
    assert await _isolation_of(cluster, silent["node_id"]) == "none"
    assert await _isolation_of(cluster, strict["node_id"]) == "strict"
    cred = strict["credential"]
    # Quiet heartbeats (no isolation) leave it alone, whichever path answers them.
    quiet_before = _hot_answered()
    for _ in range(3):
        await cluster.heartbeat(cred)
    if cluster.app.direct is not None:  # PostgreSQL: the direct route answered some of them
        assert _hot_answered() > quiet_before
    assert await _isolation_of(cluster, strict["node_id"]) == "strict"
    # The agent restarted unconfined: its first heartbeat says so, and is not swallowed by the
    # quiet heartbeats (api/direct.py on PostgreSQL, the routed quiet read) although nothing else in
    # it changed.
    await cluster.heartbeat(cred)
    answered = _hot_answered()
    await cluster.heartbeat(cred, isolation="none")
    assert _hot_answered() == answered
    assert await _isolation_of(cluster, strict["node_id"]) == "none"
    await cluster.heartbeat(cred, isolation="strict")
    await cluster.heartbeat(cred, isolation="strict")  # the same again: no change, no event
    assert await _isolation_of(cluster, strict["node_id"]) == "strict"
    async with cluster.sessionmaker() as session:
        changes = (
            await session.execute(
                select(Event.from_state, Event.to_state)
                .where(Event.node_id == strict["node_id"], Event.kind == "node.isolation")
                .order_by(Event.id)
            )
        ).all()
    assert [tuple(c) for c in changes] == [("strict", "none"), ("none", "strict")]
    bad = await cluster.http.post(
        "/v1/agent/heartbeat", json={"isolation": "loose"}, headers=_auth(cred)
    )
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert await _isolation_of(cluster, strict["node_id"]) == "strict"


def _hot_answered() -> float:
    value = PROCESS_REGISTRY.get_sample_value(
        "fairgpu_api_hot_path_requests_total", {"route": "heartbeat", "outcome": "answered"}
    )
    return value or 0.0


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_require_isolation_is_set_by_platform_admins_and_inherited(cluster: Cluster) -> None:
    parent = await cluster.org(guaranteed=8)
    child = await cluster.org(parent=parent, tenant=False)  # a group: the parent's see it all
    member = await cluster.user_token(parent)
    await cluster.call(
        "PATCH", f"/v1/orgs/{parent}", member, {"require_isolation": True}, expect=403
    )
    updated = await cluster.call(
        "PATCH", f"/v1/orgs/{parent}", cluster.admin, {"require_isolation": True}
    )
    assert updated["require_isolation"] is True
    assert updated["isolation_required"] is True
    got = await cluster.call("GET", f"/v1/orgs/{child}", cluster.admin)
    assert (got["require_isolation"], got["isolation_required"]) == (False, True)
    listed = await cluster.call("GET", "/v1/orgs", member)
    assert {o["name"]: o["isolation_required"] for o in listed["data"]} == {
        parent: True,
        child: True,
    }
    bad = await cluster.http.patch(
        f"/v1/orgs/{parent}", json={"require_isolation": "maybe"}, headers=_auth(cluster.admin)
    )
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")


async def test_isolated_org_runs_only_on_strict_nodes(cluster: Cluster) -> None:
    parent = await cluster.org(guaranteed=16)
    child = await cluster.org(parent=parent, guaranteed=0)
    await cluster.call(
        "PUT", f"/v1/orgs/{child}/quota/H100", cluster.admin, {"guaranteed": 8, "limit": None}
    )
    await cluster.call("PATCH", f"/v1/orgs/{parent}", cluster.admin, {"require_isolation": True})
    token = await cluster.user_token(child)
    loose = await _register(cluster, "none")
    await cluster.heartbeat(loose["credential"])

    job = await cluster.submit(token, gpus_per_node=2)
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{job['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "Resources"
    assert "needs a node with strict isolation" in reason["message"]
    assert reason["details"]["isolation"] == "strict"
    assert (await cluster.heartbeat(loose["credential"]))["start"] == []

    strict = await _register(cluster, "strict")
    await cluster.heartbeat(strict["credential"])
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "STARTING"
    (spec,) = (await cluster.heartbeat(strict["credential"]))["start"]
    assert spec["job_id"] == job["id"]
    assert spec["org_id"] == job["org_id"]

    # Strict nodes busy: another job of the org waits for them, not for the idle loose node.
    await cluster.call(
        "PUT", f"/v1/orgs/{child}/quota/H100", cluster.admin, {"guaranteed": 16, "limit": None}
    )
    big = await cluster.submit(token, gpus_per_node=8)
    await cluster.cycle()
    assert (await cluster.job(token, big["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{big['id']}/explain", token)
    assert explain["reasons"][0]["code"] == "Resources"
    assert "strict isolation" in explain["reasons"][0]["message"]
    assert (await cluster.heartbeat(loose["credential"]))["start"] == []

    # An org without the requirement still uses the unconfined node.
    other = await cluster.org(guaranteed=8)
    other_token = await cluster.user_token(other)
    free = await cluster.submit(other_token, gpus_per_node=8)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(loose["credential"]))["start"]
    assert spec["job_id"] == free["id"]


async def test_memory_request_reaches_the_task(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await _register(cluster, "strict")
    job = await cluster.submit(token, memory_bytes=64 << 30)
    assert job["memory_bytes"] == 64 << 30
    assert (await cluster.job(token, job["id"]))["memory_bytes"] == 64 << 30
    plain = await cluster.submit(token)
    assert plain["memory_bytes"] is None
    await cluster.cycle()
    specs = {s["job_id"]: s for s in (await cluster.heartbeat(node["credential"]))["start"]}
    assert specs[job["id"]]["memory_bytes"] == 64 << 30
    assert specs[plain["id"]]["memory_bytes"] is None
    for bad in (0, -1, 1 << 62, "64G", 1.5, True):
        r = await cluster.http.post(
            "/v1/jobs",
            json={"command": ["x"], "time_limit": 60, "memory_bytes": bad},
            headers=_auth(token),
        )
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_job_secret_reaches_every_task_of_a_gang_and_no_api_answer(
    cluster: Cluster,
) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    nodes = [await _register(cluster, "strict") for _ in range(2)]
    answers: list[str] = []
    submitted = await cluster.http.post(
        "/v1/jobs",
        json={"command": ["x"], "time_limit": 60, "nodes": 2, "gpus_per_node": 8},
        headers=_auth(token),
    )
    assert submitted.status_code == 201
    answers.append(submitted.text)
    job = submitted.json()
    await cluster.cycle()
    specs = []
    for node in nodes:
        (spec,) = (await cluster.heartbeat(node["credential"]))["start"]
        specs.append(spec)
    secrets = {s["job_secret"] for s in specs}
    assert len(secrets) == 1
    (secret,) = secrets
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert {s["node_rank"] for s in specs} == {0, 1}
    # Another job gets another secret.
    other = await cluster.submit(token, gpus_per_node=1)
    for node, spec in zip(nodes, specs, strict=True):
        await cluster.heartbeat(
            node["credential"], tasks=[report(spec["task_id"], job["id"], "running")]
        )
    jid = job["id"]
    for path in (
        f"/v1/jobs/{jid}",
        "/v1/jobs",
        "/v1/jobs?state=RUNNING&state=STARTING&state=PENDING",
        f"/v1/jobs/{jid}/events",
        f"/v1/jobs/{jid}/explain",
        f"/v1/jobs/{other['id']}",
        "/v1/nodes",
    ):
        for who in (token, cluster.admin):
            r = await cluster.http.get(path, headers=_auth(who))
            assert r.status_code in (200, 403), (path, r.status_code)
            answers.append(r.text)
    for what in ("hold", "release", "cancel"):
        r = await cluster.http.post(f"/v1/jobs/{jid}/{what}", headers=_auth(token), json={})
        answers.append(r.text)
    for text in answers:
        assert secret not in text
        assert "job_secret" not in text


async def test_image_allow_list(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    admin_token = await cluster.user_token(org)
    # Any image while the list is empty.
    await cluster.submit(token, image="docker.io/library/python:3.12")
    patterns = ["registry.example/acme/*", "registry.example/shared/base:*"]
    await cluster.call("PATCH", f"/v1/orgs/{org}", admin_token, {"image_patterns": []}, expect=403)
    updated = await cluster.call(
        "PATCH", f"/v1/orgs/{org}", cluster.admin, {"image_patterns": patterns}
    )
    assert updated["image_patterns"] == patterns
    ok = await cluster.submit(token, image="registry.example/acme/train:v3")
    assert ok["image"] == "registry.example/acme/train:v3"
    await cluster.submit(token, image="registry.example/shared/base:2026")
    await cluster.submit(token)  # no image: the command runs on the node, not in an image
    refused = await cluster.http.post(
        "/v1/jobs",
        json={"command": ["x"], "time_limit": 60, "image": "evil.example/miner:latest"},
        headers=_auth(token),
    )
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert "registry.example/acme/*" in problem["detail"]
    assert problem["allowed_images"] == patterns
    # A programme's list binds the orgs below it as well as their own lists.
    member = await cluster.org(parent=org)
    member_token = await cluster.user_token(member)
    await cluster.submit(member_token, image="registry.example/acme/train:v3")
    await cluster.call(
        "PATCH", f"/v1/orgs/{member}", cluster.admin, {"image_patterns": ["registry.example/*"]}
    )
    await cluster.submit(member_token, image="registry.example/acme/train:v3")
    for image, refused_by in (
        ("registry.example/other/x", org),
        ("evil.example/miner:latest", member),
    ):
        r = await cluster.http.post(
            "/v1/jobs",
            json={"command": ["x"], "time_limit": 60, "image": image},
            headers=_auth(member_token),
        )
        assert r.status_code == 422, (image, r.text)
        assert r.json()["org"] == refused_by
    # Cleared: any image again.
    cleared = await cluster.call("PATCH", f"/v1/orgs/{org}", cluster.admin, {"image_patterns": []})
    assert cleared["image_patterns"] == []
    await cluster.submit(token, image="evil.example/miner:latest")
    for bad in ([""], [" "], ["a b"], ["x"] * 65, "registry/*", [1], ["a\nb"]):
        r = await cluster.http.patch(
            f"/v1/orgs/{org}", json={"image_patterns": bad}, headers=_auth(cluster.admin)
        )
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


async def _started(cluster: Cluster, **spec: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await _register(cluster, "strict")
    await cluster.submit(token, **spec)
    await cluster.cycle()
    (task,) = (await cluster.heartbeat(node["credential"]))["start"]
    return token, node, task


async def test_a_task_the_agent_refuses_fails_its_job_with_the_reason(cluster: Cluster) -> None:
    token, node, task = await _started(cluster, workdir="/etc")
    job_id = task["job_id"]
    refused = report(task["task_id"], job_id, "failed_to_start", reason=REFUSED)
    reply = await cluster.heartbeat(node["credential"], tasks=[refused])
    assert reply["start"] == []
    await cluster.heartbeat(node["credential"], tasks=[refused])  # resent: changes nothing
    job = await cluster.job(token, job_id)
    assert job["state"] == "FAILED"
    assert job["state_reason"] == REFUSED
    events = (await cluster.call("GET", f"/v1/jobs/{job_id}/events", token))["data"]
    failed = [e for e in events if e["to_state"] == "FAILED"]
    assert failed
    assert all(e["reason"] == REFUSED for e in failed)
    assert len([e for e in failed if e["kind"] == "job.state"]) == 1


async def test_out_of_memory_shows_in_the_job(cluster: Cluster) -> None:
    token, node, task = await _started(cluster, memory_bytes=1 << 30)
    job_id = task["job_id"]
    cred = node["credential"]
    await cluster.heartbeat(cred, tasks=[report(task["task_id"], job_id, "running")])
    oom = report(
        task["task_id"], job_id, "exited", exit_code=None, signal=9, reason="out of memory"
    )
    await cluster.heartbeat(cred, tasks=[oom])
    job = await cluster.job(token, job_id)
    assert (job["state"], job["state_reason"]) == ("FAILED", "out of memory")
    events = (await cluster.call("GET", f"/v1/jobs/{job_id}/events", token))["data"]
    assert any(e["to_state"] == "FAILED" and e["reason"] == "out of memory" for e in events)
    assert json.dumps(job).count("out of memory") == 1
