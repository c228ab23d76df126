"""Per-tenant limits through the real app (issue #14 item 4): the highest priority class an
org may use and the caps on pending jobs, on the ordinary route (SQLite, PostgreSQL with the
hot paths off) and through the hot path (PostgreSQL, hot paths on)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest
from sqlalchemy import delete, func, select, update

from protocol.states import JobState
from scheduler.db import Job, Org, PendingJobCount
from scheduler.db.engine import asyncpg_dsn
from scheduler.metrics import PROCESS_REGISTRY
from tests.scheduling.harness import Cluster, fast_settings, running_cluster

HOT = [pytest.param(False, id="routed"), pytest.param(True, id="hot")]


def _handed_on() -> float:
    value = PROCESS_REGISTRY.get_sample_value(
        "fairgpu_api_hot_path_requests_total", {"route": "submit", "outcome": "handed_on"}
    )
    return value or 0.0


async def _post(cluster: Cluster, token: str, **spec: Any) -> Any:
    body = {"command": ["python", "train.py"], "time_limit": 3600, **spec}
    return await cluster.http.post(
        "/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"}
    )


def _skip_hot_on_sqlite(hot: bool, database_url: str) -> None:
    if hot and "postgresql" not in database_url:
        pytest.skip("the direct routes (api/direct.py) exist only on PostgreSQL")


@pytest.mark.parametrize("hot", HOT)
async def test_an_org_submits_up_to_its_priority_class(database_url: str, hot: bool) -> None:
    _skip_hot_on_sqlite(hot, database_url)
    async with running_cluster(fast_settings(database_url, hot_paths=hot)) as cluster:
        org = await cluster.org()
        user = await cluster.user_token(org)
        await cluster.submit(user)  # the token is now known: the next ones may go hot
        handed_on = _handed_on()
        high = await _post(cluster, user, priority_class="high")
        assert high.status_code == 403, high.text
        assert high.headers["content-type"].startswith("application/problem+json")
        problem = high.json()
        assert problem["max_priority_class"] == "normal"
        assert "normal" in problem["detail"]
        assert org in problem["detail"]
        if hot:
            assert _handed_on() > handed_on  # the guard in the hot insert refused it
        assert (await _post(cluster, user, priority_class="normal")).status_code == 201

        shown = await cluster.call("GET", f"/v1/orgs/{org}", cluster.admin)
        assert shown["max_priority_class"] == "normal"
        updated = await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_priority_class": "high"}
        )
        assert updated["max_priority_class"] == "high"
        assert (await _post(cluster, user, priority_class="high")).status_code == 201

        await cluster.call("PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_priority_class": "low"})
        low_only = await _post(cluster, user)
        assert low_only.status_code == 403
        assert low_only.json()["max_priority_class"] == "low"
        assert (await _post(cluster, user, priority_class="low")).status_code == 201
        back = await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_priority_class": None}
        )
        assert back["max_priority_class"] == "normal"
        bad = await cluster.http.patch(
            f"/v1/orgs/{org}",
            json={"max_priority_class": "urgent"},
            headers={"Authorization": f"Bearer {cluster.admin}"},
        )
        assert bad.status_code == 422
        member = await cluster.http.patch(
            f"/v1/orgs/{org}",
            json={"max_priority_class": "high"},
            headers={"Authorization": f"Bearer {user}"},
        )
        assert member.status_code == 403  # only platform admins raise it


@pytest.mark.parametrize("hot", HOT)
async def test_pending_jobs_are_capped_per_user_and_per_org(database_url: str, hot: bool) -> None:
    _skip_hot_on_sqlite(hot, database_url)
    settings = fast_settings(
        database_url,
        hot_paths=hot,
        max_pending_jobs_per_user=3,
        max_pending_jobs_per_org=5,
        cycle_interval_s=60.0,  # nothing starts: the jobs stay pending
    )
    async with running_cluster(settings) as cluster:
        org = await cluster.org()
        alice, bob = await cluster.user_token(org), await cluster.user_token(org)
        jobs = [await cluster.submit(alice) for _ in range(3)]
        over = await _post(cluster, alice)
        assert over.status_code == 409, over.text
        assert over.headers["content-type"].startswith("application/problem+json")
        problem = over.json()
        assert (problem["limit"], problem["cap"], problem["count"]) == (
            "max_pending_jobs_per_user",
            3,
            3,
        )
        assert "3 pending jobs" in problem["detail"]

        for _ in range(2):
            await cluster.submit(bob)
        org_full = await _post(cluster, bob)
        assert org_full.status_code == 409
        assert (org_full.json()["limit"], org_full.json()["cap"]) == ("max_pending_jobs_per_org", 5)

        raised = await cluster.call(
            "PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_pending_jobs": 6}
        )
        assert raised["max_pending_jobs"] == 6
        assert (await _post(cluster, bob)).status_code == 201  # bob 3 of 3, the org 6 of 6
        carol = await cluster.user_token(org)
        assert (await _post(cluster, carol)).json()["cap"] == 6

        # A job that leaves PENDING frees its place.
        await cluster.call("POST", f"/v1/jobs/{jobs[0]['id']}/cancel", alice, {})
        assert (await _post(cluster, carol)).status_code == 201
        await cluster.call("PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_pending_jobs": None})
        listed = await cluster.call("GET", "/v1/orgs", cluster.admin)
        assert {o["name"]: o["max_pending_jobs"] for o in listed["data"]}[org] == 5
        back = await _post(cluster, carol)
        assert (back.status_code, back.json()["cap"], back.json()["count"]) == (409, 5, 5)


@pytest.mark.parametrize("hot", HOT)
async def test_concurrent_submissions_stop_exactly_at_the_user_cap(
    database_url: str, hot: bool
) -> None:
    """12 at once against a cap of 4 (one already pending): exactly 3 more are stored. On
    PostgreSQL, before the counts were read under advisory locks, each statement counted in
    its own snapshot and those in flight together each saw room (up to 3 + 2 x pool size)."""
    _skip_hot_on_sqlite(hot, database_url)
    settings = fast_settings(
        database_url, hot_paths=hot, max_pending_jobs_per_user=4, cycle_interval_s=60.0
    )
    async with running_cluster(settings) as cluster:
        user = await cluster.user_token(await cluster.org())
        await cluster.submit(user)
        replies = await asyncio.gather(*(_post(cluster, user) for _ in range(12)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) <= {201, 409}, codes
        assert codes.count(201) == 3, codes
        assert (await _post(cluster, user)).status_code == 409


@pytest.mark.parametrize("hot", HOT)
async def test_concurrent_submissions_of_several_users_stop_exactly_at_the_org_cap(
    database_url: str, hot: bool
) -> None:
    """Three users of an org capped at 5 pending jobs submit 8 each, all at once, over real
    HTTP: the org never holds more than 5 (fails on PostgreSQL without the locked count: each
    statement's snapshot missed the jobs in flight)."""
    _skip_hot_on_sqlite(hot, database_url)
    settings = fast_settings(database_url, hot_paths=hot, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org()
        await cluster.call("PATCH", f"/v1/orgs/{org}", cluster.admin, {"max_pending_jobs": 5})
        users = [await cluster.user_token(org) for _ in range(3)]
        for user in users:  # each token known: the burst may go hot
            await cluster.submit(user)
        replies = await asyncio.gather(*(_post(cluster, u) for u in users for _ in range(8)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) <= {201, 409}, codes
        assert codes.count(201) == 2, codes
        async with cluster.sessionmaker() as session:
            pending = await session.scalar(
                select(func.count()).where(
                    Job.org_id == select(Org.id).where(Org.name == org).scalar_subquery(),
                    Job.state == JobState.PENDING,
                )
            )
        assert pending == 5
        refused = await _post(cluster, users[0])
        assert (refused.status_code, refused.json()["limit"]) == (409, "max_pending_jobs_per_org")


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_the_pending_counts_follow_every_change_of_state(database_url: str) -> None:
    """The trigger's counts (what the submit statement reads on PostgreSQL) equal the pending
    jobs themselves after submissions, a cancel, starts, a requeue and a delete."""
    settings = fast_settings(database_url, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=1)
        user = await cluster.user_token(org)
        jobs = [await cluster.submit(user, gpus_per_node=1) for _ in range(5)]
        await cluster.call("POST", f"/v1/jobs/{jobs[0]['id']}/cancel", user, {})
        await cluster.register(await cluster.join_token(), gpus=1)
        await cluster.cycle()  # one job starts

        async def counts() -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
            async with cluster.sessionmaker() as session:
                kept = {
                    (kind, owner): int(n)
                    for kind, owner, n in (
                        await session.execute(
                            select(
                                PendingJobCount.owner_kind,
                                PendingJobCount.owner_id,
                                func.sum(PendingJobCount.n),
                            ).group_by(PendingJobCount.owner_kind, PendingJobCount.owner_id)
                        )
                    ).all()
                    if n
                }
                real: dict[tuple[str, int], int] = {}
                for user_id, org_id in (
                    await session.execute(
                        select(Job.user_id, Job.org_id).where(Job.state == JobState.PENDING)
                    )
                ).all():
                    real[("user", user_id)] = real.get(("user", user_id), 0) + 1
                    real[("org", org_id)] = real.get(("org", org_id), 0) + 1
            return kept, real

        kept, real = await counts()
        assert kept == real
        assert real[("org", jobs[0]["org_id"])] == 3
        async with cluster.sessionmaker() as session:
            await session.execute(
                update(Job).where(Job.id == jobs[0]["id"]).values(state="PENDING")
            )
            await session.execute(delete(Job).where(Job.id == jobs[4]["id"]))
            await session.commit()
        kept, real = await counts()
        assert kept == real
        assert real[("org", jobs[0]["org_id"])] == 3


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_cancel_caught_in_a_deadlock_over_the_counts_is_503_and_changes_nothing(
    database_url: str,
) -> None:
    """A transaction holding the org's count row (as the scheduler does while it starts jobs)
    then wants the very job a cancel has changed: PostgreSQL aborts one of the two; when it is
    the cancel, the client gets 503 + Retry-After, not a 500, and a retry works."""
    settings = fast_settings(database_url, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org()
        user = await cluster.user_token(org)
        job = await cluster.submit(user)
        other = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute(
                "UPDATE pending_job_counts SET n = n WHERE owner_kind = 'org' AND owner_id = $1 "
                "AND slot = $2",
                job["org_id"],
                job["id"] % 16,
            )
            cancel = asyncio.create_task(
                cluster.http.post(
                    f"/v1/jobs/{job['id']}/cancel",
                    json={},
                    headers={"Authorization": f"Bearer {user}"},
                )
            )
            await asyncio.sleep(0.3)  # the cancel now holds the job's row and waits for ours
            with contextlib.suppress(asyncpg.PostgresError):
                await other.execute("UPDATE jobs SET held = held WHERE id = $1", job["id"])
            await tx.rollback()
            reply = await cancel
        finally:
            await other.close()
        if reply.status_code == 503:
            assert reply.headers["retry-after"] == "1"
            assert reply.headers["content-type"].startswith("application/problem+json")
            reply = await cluster.http.post(
                f"/v1/jobs/{job['id']}/cancel", json={}, headers={"Authorization": f"Bearer {user}"}
            )
        assert reply.status_code == 200, reply.text
        assert (await cluster.job(user, job["id"]))["state"] == "CANCELLED"
