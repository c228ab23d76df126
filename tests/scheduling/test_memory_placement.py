"""Placement by memory per GPU, through the real app over HTTP on both databases.

An agent refuses a task whose `--mem` is more than its GPUs' share of the node's memory; it
reports that share, and the scheduler places a job asking for memory only where it fits, says
why a job waits when no node's share holds it, and places as before where agents report none.
"""

from __future__ import annotations

from typing import Any

from tests.scheduling.harness import Cluster

GIB = 2**30


async def _node(cluster: Cluster, gpus: int, share: int | None) -> dict[str, Any]:
    node = await cluster.register(await cluster.join_token(), gpus=gpus, memory_per_gpu_bytes=share)
    await cluster.heartbeat(node["credential"])
    return node


async def _started(cluster: Cluster, node: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {s["job_id"]: s for s in (await cluster.heartbeat(node["credential"]))["start"]}


async def test_a_job_too_large_for_one_node_starts_on_the_one_it_fits(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    # The same size, and the small node has the lower id: placement alone would pick it.
    small = await _node(cluster, 8, 16 * GIB)
    big = await _node(cluster, 8, 120 * GIB)
    job = await cluster.submit(token, gpus_per_node=2, memory_bytes=64 * GIB)
    await cluster.cycle()
    assert await _started(cluster, small) == {}
    assert (await _started(cluster, big))[job["id"]]["memory_bytes"] == 64 * GIB
    # A job whose memory fits both nodes' shares takes the small one, the one with room.
    fits = await cluster.submit(token, gpus_per_node=8, memory_bytes=128 * GIB)
    await cluster.cycle()
    assert list(await _started(cluster, small)) == [fits["id"]]


async def test_a_job_too_large_for_every_node_waits_saying_so(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    small = await _node(cluster, 8, 16 * GIB)
    big = await _node(cluster, 8, 120 * GIB)
    job = await cluster.submit(token, gpus_per_node=1, memory_bytes=200 * GIB)
    await cluster.cycle()
    assert await _started(cluster, small) == {}
    assert await _started(cluster, big) == {}
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{job['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "BadConstraints"
    assert reason["details"]["memory_per_gpu_bytes"] == 200 * GIB
    assert reason["details"]["largest_memory_per_gpu_bytes"] == 120 * GIB
    assert "no node gives a GPU more than 120.0 GiB" in reason["message"]

    # The big node's agent restarts with more memory for its tasks: its first heartbeat says
    # so, and the job goes there.
    await cluster.heartbeat(big["credential"], isolation="strict", memory_per_gpu_bytes=256 * GIB)
    await cluster.cycle()
    assert list(await _started(cluster, big)) == [job["id"]]
    shown = await cluster.call("GET", f"/v1/nodes/{big['node_id']}", cluster.admin)
    assert shown["memory_per_gpu_bytes"] == 256 * GIB


async def test_a_node_whose_agent_reports_no_share_is_placed_as_before(cluster: Cluster) -> None:
    """An agent older than the report, or one without memory limits (`--isolation none`),
    takes any job; a node restarting so forgets the share it reported."""
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    small = await _node(cluster, 8, 16 * GIB)
    job = await cluster.submit(token, gpus_per_node=1, memory_bytes=64 * GIB)
    await cluster.cycle()
    assert await _started(cluster, small) == {}
    await cluster.heartbeat(small["credential"], isolation="none")
    await cluster.cycle()
    assert list(await _started(cluster, small)) == [job["id"]]
    shown = await cluster.call("GET", f"/v1/nodes/{small['node_id']}", token)
    assert shown["memory_per_gpu_bytes"] is None


async def test_a_share_out_of_range_is_refused_with_a_problem(cluster: Cluster) -> None:
    node = await _node(cluster, 1, 16 * GIB)
    for share in (-1, 2**63):
        answer = await cluster.http.post(
            "/v1/agent/heartbeat",
            headers={"Authorization": f"Bearer {node['credential']}"},
            json={"isolation": "strict", "memory_per_gpu_bytes": share},
        )
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
