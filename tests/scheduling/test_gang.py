"""A multi-node job: one task per node, rank 0 is the master, first failure wins the gang."""

from __future__ import annotations

from tests.scheduling.harness import Cluster, report


async def test_gang_starts_together_and_first_failure_wins(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    join = await cluster.join_token()
    a = await cluster.register(join, gpus=8)
    b = await cluster.register(join, gpus=8)
    job = await cluster.submit(token, gpus_per_node=8, nodes=2)
    await cluster.cycle()
    specs = [(await cluster.heartbeat(n["credential"]))["start"][0] for n in (a, b)]
    ranks = sorted(s["node_rank"] for s in specs)
    assert ranks == [0, 1]
    assert all(s["num_nodes"] == 2 and len(s["gpus"]) == 8 for s in specs)
    assert len({s["master_addr"] for s in specs}) == 1
    assert len({s["master_port"] for s in specs}) == 1
    by_rank = {s["node_rank"]: (s, n) for s, n in zip(specs, (a, b), strict=True)}
    for spec, node in by_rank.values():
        await cluster.heartbeat(
            node["credential"], tasks=[report(spec["task_id"], job["id"], "running")]
        )
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"

    # Rank 1 fails: rank 0 is asked to stop; the job ends FAILED (the first failure), not
    # CANCELLED (how rank 0 then ends).
    failed_spec, failed_node = by_rank[1]
    await cluster.heartbeat(
        failed_node["credential"],
        tasks=[report(failed_spec["task_id"], job["id"], "exited", exit_code=3)],
    )
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"
    spec0, node0 = by_rank[0]
    reply = await cluster.heartbeat(node0["credential"])
    assert [s["task_id"] for s in reply["stop"]] == [spec0["task_id"]]
    await cluster.heartbeat(
        node0["credential"], tasks=[report(spec0["task_id"], job["id"], "stopped", signal=15)]
    )
    ended = await cluster.job(token, job["id"])
    assert ended["state"] == "FAILED"
    assert ended["exit_code"] == 3
