"""The direct routes (api/direct.py) answer exactly what the ordinary routes answer.

On PostgreSQL quiet heartbeats and plain submissions are answered before FastAPI routes them;
every other request is handed on. The same protocol run, with the direct routes on and off, must
read the same; the cases the direct routes do not cover must still get the ordinary answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from scheduler.bench.proxy import CuttableProxy
from scheduler.db import Job, Node
from scheduler.db.engine import asyncpg_dsn
from scheduler.metrics import PROCESS_REGISTRY
from tests.scheduling.harness import Cluster, fast_settings, now, report, running_cluster, sample


def _direct(route: str, outcome: str) -> float:
    value = PROCESS_REGISTRY.get_sample_value(
        "fairgpu_api_hot_path_requests_total", {"route": route, "outcome": outcome}
    )
    return value or 0.0


def _samples(node: dict[str, Any]) -> list[dict[str, Any]]:
    at = now()
    return [
        sample(i, uuid, at, utilization_ratio=0.5, energy_joules=100.0)
        for i, uuid in enumerate(node["gpu_uuids"])
    ]


async def _protocol_run(cluster: Cluster) -> list[Any]:
    """Register, submit, start, run quietly, retry a submission: what a client sees."""
    seen: list[Any] = []
    node = await cluster.register(await cluster.join_token(), gpus=2)
    cred = node["credential"]
    org = await cluster.org(guaranteed=2)
    user = await cluster.user_token(org)
    first = await cluster.heartbeat(cred, samples=_samples(node))
    seen.append((first["start"], first["stop"]))
    job = await cluster.submit(user, gpus_per_node=2, name="hot", env={"A": "1"})
    ignored = ("id", "submitted_at", "user_id", "org_id")
    seen.append({k: v for k, v in job.items() if k not in ignored})
    retry_body = {"command": ["true"], "time_limit": "1h"}
    headers = {"Authorization": f"Bearer {user}", "Idempotency-Key": "k-1"}
    once = await cluster.http.post("/v1/jobs", json=retry_body, headers=headers)
    again = await cluster.http.post("/v1/jobs", json=retry_body, headers=headers)
    seen.append((once.status_code, again.status_code, once.json()["id"] == again.json()["id"]))
    await cluster.cycle()
    start = await cluster.heartbeat(cred, samples=_samples(node))
    seen.append([(s["job_id"] == job["id"], s["gpus"]) for s in start["start"]])
    task = start["start"][0]["task_id"]
    running = [report(task, job["id"], "running", pid=4242)]
    for _ in range(4):
        quiet = await cluster.heartbeat(cred, samples=_samples(node), tasks=running)
        seen.append((quiet["start"], quiet["stop"], quiet["heartbeat_interval_s"]))
    await cluster.runtime.flush_heartbeats()
    async with cluster.sessionmaker() as session:
        beat = await session.scalar(
            select(Node.last_heartbeat_at).where(Node.id == node["node_id"])
        )
        jobs = await session.scalar(
            select(func.count()).select_from(Job).where(Job.user_id == job["user_id"])
        )
    seen.append((beat is not None, jobs))
    seen.append((await cluster.job(user, job["id"]))["state"])
    return seen


async def test_a_protocol_run_reads_the_same_with_and_without_direct_routes(
    database_url: str,
) -> None:
    transcripts = []
    answered_before = (_direct("heartbeat", "answered"), _direct("submit", "answered"))
    for direct in (False, True):
        async with running_cluster(fast_settings(database_url, hot_paths=direct)) as cluster:
            assert (cluster.app.direct is not None) == (direct and "postgresql" in database_url)
            transcripts.append(await _protocol_run(cluster))
            if direct and "postgresql" in database_url:  # the counters reach /metrics
                scrape = (await cluster.http.get("/metrics")).text
                series = 'fairgpu_api_hot_path_requests_total{outcome="answered",route="heartbeat"}'
                assert f"{series} {_direct('heartbeat', 'answered')}" in scrape
    assert transcripts[0] == transcripts[1]
    assert transcripts[1][-1] == "RUNNING"
    heartbeats = _direct("heartbeat", "answered") - answered_before[0]
    submits = _direct("submit", "answered") - answered_before[1]
    if "postgresql" in database_url:
        # The quiet heartbeats, the submission after the first (the token is then known) and
        # the first of the keyed pair; the keyed retry is answered by the ordinary route.
        assert heartbeats >= 3
        assert submits >= 1
    else:
        assert heartbeats == submits == 0


async def test_what_the_direct_routes_do_not_cover_gets_the_ordinary_answers(
    database_url: str,
) -> None:
    async with running_cluster(fast_settings(database_url)) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred = node["credential"]
        org_a, org_b = await cluster.org(guaranteed=1), await cluster.org()
        user = await cluster.user_token(org_a)
        await cluster.submit(user)  # the token is now known to this process
        await cluster.heartbeat(cred)
        await cluster.heartbeat(cred)

        async def post(path: str, token: str, body: Any, **headers: str) -> Any:
            return await cluster.http.post(
                path, json=body, headers={"Authorization": f"Bearer {token}", **headers}
            )

        bad = await post("/v1/jobs", user, {"command": [], "time_limit": 60})
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert "command" in bad.json()["detail"]
        other = await post("/v1/jobs", user, {"command": ["x"], "time_limit": 60, "org": org_b})
        assert other.status_code == 403
        deps = await post("/v1/jobs", user, {"command": ["x"], "time_limit": 60, "depends_on": [9]})
        assert deps.status_code == 422
        assert "depends_on" in deps.json()["detail"]
        long = await post("/v1/jobs", user, {"command": ["x"], "time_limit": 10**9})
        assert long.status_code == 422
        key = await post("/v1/jobs", user, {"command": ["x"], "time_limit": 60}, **{
            "Idempotency-Key": "\x01"
        })  # fmt: skip
        assert key.status_code == 422
        assert (
            await post("/v1/jobs", cred, {"command": ["x"], "time_limit": 60})
        ).status_code == 403
        assert (await post("/v1/jobs", "fg_u_nope", {"command": ["x"]})).status_code == 401
        no_default = await post("/v1/jobs", user, {"command": ["x"]})  # the org's default limit
        assert no_default.status_code == 201, no_default.text

        beat = await post("/v1/agent/heartbeat", cred, {"wait_s": -1})
        assert beat.status_code == 422
        assert (await post("/v1/agent/heartbeat", user, {})).status_code == 403
        assert (await post("/v1/agent/heartbeat", "fg_a_nope", {})).status_code == 401
        raw = await cluster.http.post(
            "/v1/agent/heartbeat",
            content=b"{}",
            headers={"Authorization": f"Bearer {cred}", "Content-Type": "text/plain"},
        )
        assert raw.status_code in (200, 415, 422), raw.text
        # Registering again (with the credential) rotates it: the old one is refused at once.
        again = await cluster.register(cred, gpus=1, name=node["node_name"])
        assert (await post("/v1/agent/heartbeat", cred, {})).status_code == 401
        assert (await post("/v1/agent/heartbeat", again["credential"], {})).status_code == 200


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_submission_cut_off_from_the_database_is_503_and_retried_once(
    database_url: str,
) -> None:
    """The network to PostgreSQL fails while a direct insert waits: the client gets 503 +
    Retry-After (the insert may have happened), and its retry with the same Idempotency-Key
    finds the job stored exactly once."""
    proxy = CuttableProxy(make_url(database_url).port or 5432)
    proxy.restore()
    via_proxy = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    watch = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with running_cluster(fast_settings(via_proxy)) as cluster:
            assert cluster.app.direct is not None
            user = await cluster.user_token(await cluster.org())
            await cluster.submit(user)  # warms the lean pool and this process's token cache
            headers = {"Authorization": f"Bearer {user}", "Idempotency-Key": "cut-1"}
            body = {"command": ["train"], "time_limit": 60}
            lock = admin.transaction()
            await lock.start()
            await admin.execute("LOCK TABLE jobs IN SHARE MODE")  # inserts wait
            pending = asyncio.create_task(cluster.http.post("/v1/jobs", json=body, headers=headers))
            for _ in range(200):  # (pg_stat_activity is a snapshot inside a transaction)
                waiting = await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'fairgpu-lean' AND wait_event_type = 'Lock'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert waiting, "the direct insert never waited for the lock"
            proxy.cut()
            cut = await pending
            await lock.rollback()  # the orphaned insert now completes on the server
            proxy.restore()
            assert cut.status_code == 503, cut.text
            assert cut.headers["retry-after"] == "5"
            assert cut.headers["content-type"].startswith("application/problem+json")
            for _ in range(50):
                retry = await cluster.http.post("/v1/jobs", json=body, headers=headers)
                if retry.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            assert retry.status_code in (200, 201), retry.text
            stored = await admin.fetchval(
                "SELECT count(*) FROM jobs WHERE idempotency_key = 'cut-1'"
            )
            assert stored == 1
    finally:
        proxy.cut()
        await admin.close()
        await watch.close()


async def test_non_finite_numbers_are_refused(database_url: str) -> None:
    """NaN and Infinity parse (Python's JSON accepts them) but are not JSON: a sample holding
    one could never be stored, so it is a 422, not a flush failing forever."""
    async with running_cluster(fast_settings(database_url)) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        headers = {
            "Authorization": f"Bearer {node['credential']}",
            "Content-Type": "application/json",
        }
        for value in ("NaN", "Infinity", "-Infinity"):
            sample = json.dumps(
                {"index": 0, "uuid": node["gpu_uuids"][0], "sampled_at": now().isoformat()}
            )
            body = f'{{"samples": [{sample[:-1]}, "temperature_c": {value}}}]}}'
            response = await cluster.http.post(
                "/v1/agent/heartbeat", content=body.encode(), headers=headers
            )
            assert response.status_code == 422, response.text
            assert "temperature_c" in response.json()["detail"]
        admin = {"Authorization": f"Bearer {cluster.admin}", "Content-Type": "application/json"}
        org = await cluster.http.post(
            "/v1/orgs", content=b'{"name": "nan-org", "shares": NaN}', headers=admin
        )
        assert org.status_code == 422, org.text
        assert (await cluster.heartbeat(node["credential"]))["stop"] == []
