"""Placement by agent capabilities, through the real app over HTTP on both databases.

A job with `--signal` needs an agent that delivers the warning ("signal"), an interactive one an
agent that opens terminals ("pty"), one with an image an agent whose container runtime answers
("container"): the scheduler places such a job only on nodes whose agent
said so, never preempts for it where it could not run, and explains the wait with numbers.
"""

from __future__ import annotations

from typing import Any

from protocol.agent import AGENT_CAPABILITIES
from tests.scheduling.harness import Cluster, report

EVERY = list(AGENT_CAPABILITIES)


async def _node(cluster: Cluster, gpus: int, capabilities: list[str] | None) -> dict[str, Any]:
    node = await cluster.register(await cluster.join_token(), gpus=gpus, capabilities=capabilities)
    await cluster.heartbeat(node["credential"])
    return node


async def _started(cluster: Cluster, node: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {s["job_id"]: s for s in (await cluster.heartbeat(node["credential"]))["start"]}


async def test_a_signal_job_goes_to_the_node_whose_agent_takes_signals(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    # The two nodes are the same size and the older agent's has the lower id: placement alone
    # would pick it. (The same size: packing would put the plain job below on a partly used
    # capable node rather than an empty one.)
    old = await _node(cluster, 2, None)
    capable = await _node(cluster, 2, EVERY)
    job = await cluster.submit(token, gpus_per_node=2, signal="USR1@30")
    await cluster.cycle()
    assert await _started(cluster, old) == {}
    spec = (await _started(cluster, capable))[job["id"]]
    assert spec["signal"] == {"name": "USR1", "lead_s": 30.0, "batch_only": False}
    # A plain job still takes the older agent's node.
    plain = await cluster.submit(token, gpus_per_node=2)
    await cluster.cycle()
    assert list(await _started(cluster, old)) == [plain["id"]]


async def test_with_only_incapable_nodes_the_job_waits_with_the_reason(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    old = await _node(cluster, 8, None)
    no_pty = await _node(cluster, 8, ["signal", "port-forward"])
    warned = await cluster.submit(token, gpus_per_node=8, signal="USR1@30")
    shell = await cluster.submit(token, command=["bash"], interactive=True, gpus_per_node=1)
    await cluster.cycle()
    assert (await cluster.job(token, shell["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{shell['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "Resources"
    assert reason["details"]["capabilities"] == "pty"
    assert reason["details"]["capable_nodes"] == 0
    assert "agent can do pty" in reason["message"]
    # The signal job fits the capable node; the old agent's node got nothing.
    assert list(await _started(cluster, no_pty)) == [warned["id"]]
    assert await _started(cluster, old) == {}
    assert (await cluster.job(token, shell["id"]))["state"] == "PENDING"

    # The agent restarts upgraded: its first heartbeat says so, and the shell goes there.
    await cluster.heartbeat(old["credential"], capabilities=EVERY)
    await cluster.cycle()
    assert list(await _started(cluster, old)) == [shell["id"]]


async def test_a_job_never_preempts_on_a_node_it_could_not_use(cluster: Cluster) -> None:
    """An owner's `--signal` job in quota reclaims only from nodes that could run it: the
    borrower on an older agent's node keeps running, and the owner's job waits."""
    borrower_org = await cluster.org(guaranteed=0, limit=8)
    owner_org = await cluster.org(guaranteed=8, limit=8)
    borrower = await cluster.user_token(borrower_org)
    owner = await cluster.user_token(owner_org)
    old = await _node(cluster, 8, None)
    lent = await cluster.submit(borrower, gpus_per_node=8, preemptible=True)
    await cluster.cycle()
    (spec,) = (await _started(cluster, old)).values()
    await cluster.heartbeat(
        old["credential"], tasks=[report(spec["task_id"], lent["id"], "running")]
    )

    warned = await cluster.submit(owner, gpus_per_node=8, signal="USR1@30")
    await cluster.cycle()
    assert (await cluster.heartbeat(old["credential"]))["stop"] == []
    assert (await cluster.job(borrower, lent["id"]))["state"] == "RUNNING"
    explain = await cluster.call("GET", f"/v1/jobs/{warned['id']}/explain", owner)
    assert explain["reasons"][0]["code"] == "Resources"
    assert explain["reasons"][0]["details"]["capabilities"] == "signal"

    # A node that could run it appears: the job starts there, still preempting no one.
    capable = await _node(cluster, 8, EVERY)
    await cluster.cycle()
    assert list(await _started(cluster, capable)) == [warned["id"]]
    assert (await cluster.heartbeat(old["credential"]))["stop"] == []


async def test_an_image_job_goes_only_to_a_node_with_a_container_runtime(cluster: Cluster) -> None:
    """A node whose agent has no container runtime (or one that does not answer) does not say
    "container": a job with an image waits for one that does, with the reason, rather than
    failing at start there; a job without an image still runs there."""
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    bare = await _node(cluster, 2, EVERY)  # the tighter fit: best fit alone would pick it
    image = await cluster.submit(token, gpus_per_node=1, image="python:3.11")
    plain = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    assert list(await _started(cluster, bare)) == [plain["id"]]
    assert (await cluster.job(token, image["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{image['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["code"] == "Resources"
    assert reason["details"]["capabilities"] == "container"
    assert "agent can do container" in reason["message"], reason
    # An older agent (no capabilities at all) is no better.
    await _node(cluster, 2, None)
    await cluster.cycle()
    assert (await cluster.job(token, image["id"]))["state"] == "PENDING"
    able = await _node(cluster, 8, [*EVERY, "container"])
    await cluster.cycle()
    assert (await _started(cluster, able))[image["id"]]["image"] == "python:3.11"
