"""A job's own bytes reach the server through its node: its output, and reasons that quote it.
None of them may fail the node's heartbeat (a NUL character, which PostgreSQL's text refuses,
did: the agent sent it again every heartbeat until the node was declared down and every org's
tasks on it ended NODE_FAIL)."""

from __future__ import annotations

import pytest

from tests.scheduling.harness import fast_settings, report, running_cluster

pytestmark = pytest.mark.parametrize("direct", [True, False], ids=["direct", "routed"])


async def test_a_job_writing_nul_bytes_does_not_take_its_node_down(
    database_url: str, direct: bool
) -> None:
    async with running_cluster(fast_settings(database_url, hot_paths=direct)) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=2)
        cred = node["credential"]
        hostile = await cluster.user_token(await cluster.org(guaranteed=1))
        victim = await cluster.user_token(await cluster.org(guaranteed=1))
        bad = await cluster.submit(hostile, gpus_per_node=1)
        good = await cluster.submit(victim, gpus_per_node=1)
        await cluster.cycle()
        specs = {s["job_id"]: s["task_id"] for s in (await cluster.heartbeat(cred))["start"]}
        assert set(specs) == {bad["id"], good["id"]}
        running = [report(task, job, "running") for job, task in specs.items()]
        await cluster.heartbeat(cred, tasks=running)
        output = "before\x00after\n"
        chunk = {"task_id": specs[bad["id"]], "offset": 0, "next_offset": 13, "data": output}
        await cluster.heartbeat(cred, tasks=running, logs=[chunk])  # 200, or this raises
        ended = report(specs[bad["id"]], bad["id"], "failed_to_start", reason="no\x00such file")
        await cluster.heartbeat(cred, tasks=[ended, running[1]])
        logs = await cluster.call("GET", f"/v1/jobs/{bad['id']}/logs", hostile)
        assert logs["data"] == "before\ufffdafter\n"
        job = await cluster.job(hostile, bad["id"])
        assert (job["state"], job["state_reason"]) == ("FAILED", "no\ufffdsuch file")
        # The node and the other org's job carry on.
        done = report(specs[good["id"]], good["id"], "exited", exit_code=0)
        await cluster.heartbeat(cred, tasks=[done])
        assert (await cluster.job(victim, good["id"]))["state"] == "COMPLETED"
        nodes = await cluster.call("GET", "/v1/nodes", cluster.admin)
        assert [n["state"] for n in nodes["data"]] == ["ready"]


async def test_a_nul_in_what_names_a_node_is_422(database_url: str, direct: bool) -> None:
    async with running_cluster(fast_settings(database_url, hot_paths=direct)) as cluster:
        join = await cluster.join_token()
        gpu = {"index": 0, "uuid": "GPU-n", "model": "H100", "memory_bytes": 1}
        body = {
            "name": "n1", "site": "dc1", "domain": "r1", "hostname": "n1", "address": "a",
            "agent_version": "t", "gpus": [gpu],
        }  # fmt: skip
        for bad in (
            {"hostname": "n\x001"},
            {"address": "\x00"},
            {"agent_version": "1\x00"},
            {"gpus": [{**gpu, "uuid": "GPU-\x00"}]},
            {"gpus": [{**gpu, "model": "H\x00100"}]},
        ):
            await cluster.call("POST", "/v1/agent/register", join, {**body, **bad}, expect=422)
        await cluster.call("POST", "/v1/agent/register", join, body, expect=200)
