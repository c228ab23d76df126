"""An image job without a command, through the real app over HTTP on both databases: stored and
shown as submitted (no command), refused without an image, and placed only on nodes whose agent
says "image-cmd" (it runs the image's ENTRYPOINT and CMD; older agents refuse such a task), every
task of a gang told the same."""

from __future__ import annotations

from typing import Any

from protocol.agent import AGENT_CAPABILITIES
from tests.scheduling.harness import Cluster

CAPABLE = [*AGENT_CAPABILITIES, "container"]
OLDER = [c for c in CAPABLE if c != "image-cmd"]


async def _node(cluster: Cluster, gpus: int, capabilities: list[str] | None) -> dict[str, Any]:
    node = await cluster.register(await cluster.join_token(), gpus=gpus, capabilities=capabilities)
    await cluster.heartbeat(node["credential"])
    return node


async def _started(cluster: Cluster, node: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {s["job_id"]: s for s in (await cluster.heartbeat(node["credential"]))["start"]}


async def test_only_an_image_job_may_leave_out_its_command(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    body = {"time_limit": 3600, "image": "pytorch/pytorch:2.3.0"}
    absent = await cluster.call("POST", "/v1/jobs", token, body, 201)
    empty = await cluster.call("POST", "/v1/jobs", token, {**body, "command": []}, 201)
    for job in (absent, empty):
        assert (await cluster.job(token, job["id"]))["command"] == []
    listed = await cluster.call("GET", "/v1/jobs", token)
    assert {j["id"]: j["command"] for j in listed["data"]} == {absent["id"]: [], empty["id"]: []}
    for bare in ({"time_limit": 3600}, {"time_limit": 3600, "command": []}):
        problem = await cluster.call("POST", "/v1/jobs", token, bare, 422)
        message = "Value error, a job without an image needs a command"
        assert problem["errors"] == [{"field": "body.command", "message": message}], problem
    script = {**body, "script": "#!/bin/sh\necho hi\n"}
    problem = await cluster.call("POST", "/v1/jobs", token, script, 422)
    assert "a script needs a command" in problem["detail"], problem
    # The refused submissions stored nothing. (Whole rows are not compared: the scheduler's
    # cycle, every 0.2 s in the background, writes a pending job's reason in between: in CI.)
    after = (await cluster.call("GET", "/v1/jobs", token))["data"]
    assert [(j["id"], j["command"]) for j in after] == [
        (j["id"], j["command"]) for j in listed["data"]
    ]


async def test_an_image_job_without_a_command_goes_only_to_an_agent_that_runs_cmd(
    cluster: Cluster,
) -> None:
    """An agent older than "image-cmd" would refuse the heartbeat reply carrying the task: the
    job waits for one that says it, where every task of its gang has no command."""
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    older = [await _node(cluster, 2, OLDER) for _ in range(2)]  # room for the gang
    job = await cluster.submit(token, command=[], image="trainer:1", nodes=2, gpus_per_node=1)
    given = await cluster.submit(token, image="trainer:1", gpus_per_node=1)  # has its command
    await cluster.cycle()
    started = [list(await _started(cluster, node)) for node in older]
    assert sorted(started) == [[], [given["id"]]]
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"
    explain = await cluster.call("GET", f"/v1/jobs/{job['id']}/explain", token)
    (reason,) = explain["reasons"]
    assert reason["details"]["capabilities"] == "container,image-cmd", reason
    able = [await _node(cluster, 1, CAPABLE) for _ in range(2)]
    await cluster.cycle()
    tasks = [(await _started(cluster, node))[job["id"]] for node in able]
    assert sorted(t["node_rank"] for t in tasks) == [0, 1]
    assert {(t["image"], tuple(t["command"])) for t in tasks} == {("trainer:1", ())}
