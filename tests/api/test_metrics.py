"""`/metrics`: valid exposition (promtool), Kueue-shaped names, numbers that match the cluster."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_are_valid_and_describe_the_cluster(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=4, limit=6)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    running = await cluster.submit(token, gpus_per_node=4)
    borrowed = await cluster.submit(token, gpus_per_node=2, preemptible=True)
    await cluster.cycle()
    starts = (await cluster.heartbeat(node["credential"]))["start"]
    assert {s["job_id"] for s in starts} == {running["id"], borrowed["id"]}
    await cluster.heartbeat(
        node["credential"], tasks=[report(s["task_id"], s["job_id"], "running") for s in starts]
    )
    waiting = await cluster.submit(token, gpus_per_node=1)  # over the limit of 6: OrgLimit
    await cluster.cycle()

    response = await cluster.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    promtool = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await promtool.communicate(text.encode())
    assert promtool.returncode == 0, out.decode()

    m = _samples(text)
    assert m[("fairgpu_scheduler_leader", ())] == 1
    assert m[("fairgpu_running_jobs", (("org", org),))] == 2
    assert m[("fairgpu_org_guaranteed_gpus", (("gpu_type", "H100"), ("org", org)))] == 4
    assert m[("fairgpu_org_limit_gpus", (("gpu_type", "H100"), ("org", org)))] == 6
    assert m[("fairgpu_org_allocated_gpus", (("gpu_type", "H100"), ("org", org)))] == 6
    assert m[("fairgpu_org_borrowed_gpus", (("gpu_type", "H100"), ("org", org)))] == 2
    assert m[("fairgpu_pending_jobs", (("org", org), ("reason", "OrgLimit")))] == 1
    assert 0 < m[("fairgpu_org_fairshare_factor", (("org", org),))] <= 1
    assert m[("fairgpu_nodes", (("state", "ready"),))] == 1
    assert m[("fairgpu_gpus", (("gpu_type", "H100"), ("health", "healthy")))] == 8
    assert m[("fairgpu_admission_wait_seconds_count", (("org", org),))] == 2
    assert m[("fairgpu_scheduling_cycles_total", (("result", "ok"),))] >= 2
    assert m[("fairgpu_scheduling_cycle_duration_seconds_count", ())] >= 2
    # No job ids or user names as labels.
    assert str(waiting["id"]) not in {v for (_, labels) in m for _, v in labels}
    assert all(name not in ("job", "job_id", "user") for (_, labels) in m for name, _ in labels)


async def test_metrics_need_no_token_on_the_servers_machine(cluster: Cluster) -> None:
    """ASGITransport's client is 127.0.0.1 (elsewhere: tests/security/test_tenant_views)."""
    response = await cluster.http.get("/metrics")
    assert response.status_code == 200
    assert "fairgpu_scheduling_cycles_total" in response.text
