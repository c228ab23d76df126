"""Orgs, quotas, shares, usage reports and nodes through the real app."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from protocol.states import JobState
from scheduler.db import Allocation, Gpu, Node, OrgUsage, Task, UsageRecord
from scheduler.services import usage
from scheduler.states import NodeState
from tests.api.helpers import World


async def test_org_tree_and_quota_rules(world: World) -> None:
    async with world.client("platform") as c:
        assert (await c.post("/v1/orgs", json={"name": "prog"})).status_code == 201
        for name in ("acme", "beta"):
            r = await c.post("/v1/orgs", json={"name": name, "parent": "prog", "shares": 2})
            assert r.status_code == 201
        assert (await c.post("/v1/orgs", json={"name": "acme"})).status_code == 409
        assert (await c.post("/v1/orgs", json={"name": "x", "parent": "nope"})).status_code == 404
        assert (await c.post("/v1/orgs", json={"name": "bad name"})).status_code == 422
        assert (await c.post("/v1/orgs", json={"name": "z", "shares": 0})).status_code == 422

        async def put(org: str, guaranteed: int, limit: int | None = None) -> int:
            r = await c.put(
                f"/v1/orgs/{org}/quota/H100", json={"guaranteed": guaranteed, "limit": limit}
            )
            return r.status_code

        assert await put("prog", 16, 32) == 200
        assert await put("acme", 10) == 409  # no limit under a parent with one
        assert await put("acme", 10, 32) == 200
        assert await put("beta", 7, 16) == 409  # 10 + 7 > 16
        assert await put("beta", 6, 16) == 200
        assert await put("beta", 6, 33) == 409  # above the parent's limit
        assert await put("prog", 15, 32) == 409  # below the children's 16
        assert await put("prog", 20, 24) == 409  # below a child's limit of 32
        assert await put("prog", 20, 32) == 200
        assert await put("acme", 5, 4) == 422  # limit below guarantee
        r = await c.put("/v1/orgs/acme/quota/H100", json={"guaranteed": -1})
        assert r.status_code == 422
        r = await c.put("/v1/orgs/acme/quota/bad%20type", json={"guaranteed": 1})
        assert r.status_code == 422
        tree = (await c.get("/v1/orgs")).json()["data"]
        r = await c.patch("/v1/orgs/acme", json={"shares": 3, "default_time_limit": "2h"})
        assert r.json()["shares"] == 3
        assert r.json()["default_time_limit_s"] == 7200
    async with world.client("platform") as c:
        assert (await c.delete("/v1/orgs/prog")).status_code == 409  # has children
        assert (await c.delete("/v1/orgs/org-a")).status_code == 409  # has users
        assert (await c.post("/v1/orgs", json={"name": "empty"})).status_code == 201
        assert (await c.delete("/v1/orgs/empty")).status_code == 204
        assert (await c.get("/v1/orgs/empty")).status_code == 404
    async with world.client("admin_a") as c:
        assert (await c.delete("/v1/orgs/org-a")).status_code == 403
    paths = [o["path"] for o in tree]
    assert paths == sorted(paths)
    assert {"prog/acme", "prog/beta", "prog"} <= set(paths)
    acme = next(o for o in tree if o["name"] == "acme")
    assert acme["depth"] == 1
    assert acme["quotas"] == [{"gpu_type": "H100", "guaranteed": 10, "limit": 32}]
    assert world.runtime.notified.count("quota") == 4


async def test_shares_standing(world: World) -> None:
    assert world.node is not None
    async with world.app.state.sessionmaker() as s:
        s.add(OrgUsage(org_id=world.org_a.id, decayed_gpu_seconds=5_000_000.0))
        await s.commit()
    async with world.client("platform") as c:
        body = (await c.get("/v1/shares")).json()
    async with world.client("member_b") as c:
        only_b = (await c.get("/v1/shares")).json()["data"]
    rows = {r["org"]: r for r in body["data"]}
    a, b = rows["org-a"], rows["org-b"]
    assert a["shares_norm"] == b["shares_norm"] == 0.5
    assert a["fairshare_factor"] < 0.5 < b["fairshare_factor"] == 1.0
    assert a["decayed_usage_gpu_s"] < 5_000_000.0  # decayed since it was written
    assert a["recover_s"] > 0
    assert a["recovers_at"] is not None
    assert b["recover_s"] == 0.0
    assert [r["org"] for r in only_b] == ["org-b"]


async def test_usage_report_json_and_csv(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    jan = datetime(2026, 1, 5, 10, tzinfo=UTC)  # a Monday
    job_a = await world.job("member_a")
    job_b = await world.job("member_b")
    assert world.node is not None
    async with world.app.state.sessionmaker() as s:
        gpu = await s.scalar(select(Gpu).where(Gpu.node_id == world.node.id))
        assert gpu is not None
        for job, hours in ((job_a, [0, 1, 26]), (job_b, [0])):
            task = Task(job_id=job.id, node_rank=0, node_id=world.node.id, state=JobState.COMPLETED)
            s.add(task)
            await s.flush()
            alloc = Allocation(
                task_id=task.id,
                job_id=job.id,
                org_id=job.org_id,
                user_id=job.user_id,
                gpu_id=gpu.id,
                gpu_type="H100",
                started_at=jan,
                ended_at=jan,
            )
            s.add(alloc)
            await s.flush()
            for h in hours:
                s.add(
                    UsageRecord(
                        allocation_id=alloc.id,
                        org_id=job.org_id,
                        user_id=job.user_id,
                        job_id=job.id,
                        gpu_type="H100",
                        period_start=jan + timedelta(hours=h),
                        gpu_seconds_allocated=3600.0,
                        gpu_seconds_busy=1800.0,
                        billed_gpu_seconds=3600.0,
                        energy_joules=1000.0,
                        preempted=h == 26,
                    )
                )
        await s.commit()
    window = "since=2026-01-01T00:00:00Z&until=2026-02-01T00:00:00Z"
    async with world.client("platform") as c:
        daily = (await c.get(f"/v1/usage?by=org&period=day&{window}")).json()["data"]
        weekly = (await c.get(f"/v1/usage?by=gpu_type&period=week&{window}")).json()["data"]
        csv_text = (await c.get(f"/v1/usage?by=user&period=month&{window}&format=csv")).text
    async with world.client("member_a") as c:
        own = (await c.get(f"/v1/usage?by=org&period=month&{window}")).json()["data"]
    assert [(r["period_start"][:10], r["key"], r["gpu_hours_allocated"]) for r in daily] == [
        ("2026-01-05", "org-a", 2.0),
        ("2026-01-05", "org-b", 1.0),
        ("2026-01-06", "org-a", 1.0),
    ]
    assert daily[2]["preempted_gpu_hours"] == 1.0
    assert weekly == [
        {
            "period_start": "2026-01-05T00:00:00Z",
            "key": "H100",
            "gpu_hours_allocated": 4.0,
            "gpu_hours_busy": 2.0,
            "billed_gpu_hours": 4.0,
            "energy_joules": 4000.0,
            "preempted_gpu_hours": 1.0,
        }
    ]
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert {(r["key"], float(r["gpu_hours_allocated"])) for r in rows} == {
        ("org-a/member-a", 3.0),
        ("org-b/member-b", 1.0),
    }
    assert [(r["key"], r["gpu_hours_allocated"]) for r in own] == [("org-a", 3.0)]

    # A report is bounded in lines (periods x keys): past the bound, a 422 that says how to
    # narrow it, never a response that grows with the window.
    monkeypatch.setattr(usage, "MAX_REPORT_LINES", 2)
    async with world.client("platform") as c:
        refused = await c.get(f"/v1/usage?by=org&period=day&{window}")
        fits = await c.get(f"/v1/usage?by=org&period=month&{window}")
    assert refused.status_code == 422
    assert "more than 2 lines" in refused.json()["detail"]
    assert [r["key"] for r in fits.json()["data"]] == ["org-a", "org-b"]


async def test_nodes_drain_and_resume(world: World) -> None:
    assert world.node is not None
    node_id = world.node.id
    busy = await world.job("member_a", state=JobState.RUNNING)
    async with world.client("platform") as c:
        listed = (await c.get("/v1/nodes")).json()["data"]
        drained = (await c.post(f"/v1/nodes/{node_id}/drain", json={"reason": "bios"})).json()
        resumed = (await c.post(f"/v1/nodes/{node_id}/resume")).json()
        async with world.app.state.sessionmaker() as s:
            s.add(Task(job_id=busy.id, node_rank=0, node_id=node_id, state=JobState.RUNNING))
            await s.commit()
        draining = (await c.post(f"/v1/nodes/{node_id}/drain")).json()
        async with world.app.state.sessionmaker() as s:
            node = await s.get(Node, node_id)
            assert node is not None
            node.state = NodeState.DOWN
            await s.commit()
        refused = await c.post(f"/v1/nodes/{node_id}/resume")
        missing = await c.post("/v1/nodes/999999/drain")
    assert listed[0]["gpus_total"] == 8
    assert [g["index"] for g in listed[0]["gpus"]] == list(range(8))
    assert (drained["state"], drained["state_reason"]) == ("drained", "bios")
    assert resumed["state"] == "ready"
    assert draining["state"] == "draining"
    assert refused.status_code == 409
    assert missing.status_code == 404
    assert world.runtime.notified.count("drain") == 2
