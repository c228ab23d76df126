"""Reclaim: an org takes its guarantee back from a borrower, through the agent, end to end."""

from __future__ import annotations

import json

from sqlalchemy import select

from scheduler.db import Task, UsageRecord
from scheduler.services.invariants import check_invariants
from tests.scheduling.harness import Cluster, report


async def test_reclaim_preempts_the_borrower_and_requeues_it(cluster: Cluster) -> None:
    borrower_org = await cluster.org(guaranteed=0, limit=8)
    owner_org = await cluster.org(guaranteed=8, limit=8)
    borrower = await cluster.user_token(borrower_org)
    owner = await cluster.user_token(owner_org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]

    lent = await cluster.submit(borrower, gpus_per_node=8, preemptible=True)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], lent["id"], "running")])

    wanted = await cluster.submit(owner, gpus_per_node=8)
    await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    assert reply["start"] == []  # the GPUs are not free until the borrower has stopped
    assert [(s["task_id"], s["reason"]) for s in reply["stop"]] == [(spec["task_id"], "preempt")]
    explain = await cluster.call("GET", f"/v1/jobs/{wanted['id']}/explain", owner)
    assert explain["state"] == "PENDING"

    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], lent["id"], "stopped", signal=15)])
    requeued = await cluster.job(borrower, lent["id"])
    assert requeued["state"] == "PENDING"
    assert requeued["requeue_count"] == 1

    await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    assert [s["job_id"] for s in reply["start"]] == [wanted["id"]]
    assert (await cluster.job(owner, wanted["id"]))["state"] == "STARTING"

    async with cluster.sessionmaker() as session:
        first = await session.get(Task, spec["task_id"])
        assert first is not None
        assert first.state.value == "PREEMPTED"
        flags = set(
            await session.scalars(
                select(UsageRecord.preempted).where(UsageRecord.job_id == lent["id"])
            )
        )
        invariants = await check_invariants(session)
    assert flags == {True}  # the borrower's lost usage is marked as lost to preemption
    assert invariants.ok, invariants.violations
    metrics = (await cluster.http.get("/metrics")).text
    assert 'fairgpu_preemptions_total{reason="reclaim"} 1.0' in metrics


async def test_a_job_with_a_signal_is_warned_at_preemption_and_gets_its_lead_as_grace(
    cluster: Cluster,
) -> None:
    borrower_org = await cluster.org(guaranteed=0, limit=8)
    owner_org = await cluster.org(guaranteed=8, limit=8)
    borrower = await cluster.user_token(borrower_org)
    owner = await cluster.user_token(owner_org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]

    warned = await cluster.submit(borrower, gpus_per_node=4, preemptible=True, signal="usr1@20")
    plain = await cluster.submit(borrower, gpus_per_node=4, preemptible=True)
    assert (warned["signal"], plain["signal"]) == ("USR1@20", None)
    await cluster.cycle()
    specs = {s["job_id"]: s for s in (await cluster.heartbeat(cred))["start"]}
    assert specs[warned["id"]]["signal"] == {"name": "USR1", "lead_s": 20.0, "batch_only": False}
    assert "signal" not in specs[plain["id"]]  # left out: agents older than the field take it
    await cluster.heartbeat(
        cred, tasks=[report(s["task_id"], job_id, "running") for job_id, s in specs.items()]
    )

    await cluster.submit(owner, gpus_per_node=8)
    await cluster.cycle()
    stops = {s["task_id"]: s for s in (await cluster.heartbeat(cred))["stop"]}
    # The configured grace is 1 s; the warned job gets its 20 s and the signal instead of TERM.
    assert stops[specs[warned["id"]]["task_id"]] == {
        "task_id": specs[warned["id"]]["task_id"],
        "reason": "preempt",
        "grace_s": 20.0,
        "signal": True,
    }
    assert stops[specs[plain["id"]]["task_id"]] == {
        "task_id": specs[plain["id"]]["task_id"],
        "reason": "preempt",
        "grace_s": 1.0,
    }


async def test_signal_validation(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8, limit=8)
    user = await cluster.user_token(org)
    job = await cluster.submit(user, signal="b:SIGUSR2", time_limit=120)
    assert job["signal"] == "B:USR2@60"  # normalised; 60 s when SECONDS is left out
    # `update --time` may not bring the limit under the signal's lead either.
    path = f"/v1/jobs/{job['id']}"
    problem = await cluster.call("PATCH", path, user, {"time_limit": 59}, expect=422)
    assert "more than the time limit of 59 s" in problem["detail"], problem
    await cluster.call("PATCH", path, user, {"time_limit": 60}, expect=200)
    assert (await cluster.submit(user, signal="10@5"))["signal"] == "USR1@5"
    for signal, time_limit, words in [
        ("USR1@121", 120, "more than the time limit of 120 s"),
        ("USR1@601", 3600, "more than the maximum of 600 s"),
        ("NOPE@10", 3600, "unknown signal"),
        ("KILL@10", 3600, "cannot be caught"),
        ("USR1@0", 3600, "positive integer"),
        ("X:USR1@10", 3600, "only B:"),
    ]:
        body = {"command": ["true"], "time_limit": time_limit, "signal": signal}
        problem = await cluster.call("POST", "/v1/jobs", user, body, expect=422)
        assert words in json.dumps(problem), (signal, problem)
    array = {"command": ["true"], "time_limit": 60, "signal": "USR1@61", "array": "0-3"}
    await cluster.call("POST", "/v1/jobs", user, array, expect=422)
