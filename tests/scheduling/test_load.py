"""LOAD reads the snapshot the core would get from the rows themselves, to the microsecond.

The load computes timestamps in SQL and builds the snapshot in a worker thread; these tests
compare what it returns with what the ORM rows say, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from protocol.states import GpuHealth, JobState
from scheduler.core.types import DependencyState, PendingJob, Placement, RunningJob
from scheduler.db import Allocation, Job, JobDependency, OrgUsage
from scheduler.db.engine import make_sessionmaker
from scheduler.services.accounting import HeldInterval, fold_usage
from scheduler.services.scheduling.load import Loaded, isolated_orgs, load_snapshot
from scheduler.settings import Settings
from scheduler.states import NodeState
from tests import factories

# Microseconds that a float round trip through text or a julianday would get wrong.
T0 = datetime(2025, 3, 9, 1, 59, 58, 123457, tzinfo=UTC)
SETTINGS = Settings(database_url="sqlite:///unused.db")


async def _load(
    engine: AsyncEngine, now: datetime, previously_open: frozenset[int] | None
) -> Loaded:
    async with make_sessionmaker(engine)() as s, s.begin():
        return await load_snapshot(
            s, now=now, config=SETTINGS.policy.to_policy_config(), previously_open=previously_open
        )


async def test_snapshot_matches_the_rows(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)
    async with maker() as s:
        parent_org = await factories.org(s, shares=2.0)
        org = await factories.org(s, parent_id=parent_org.id)
        await factories.quota(s, org, guaranteed=2, limit=4)
        user = await factories.user(s, org)
        node, gpus = await factories.node(s, gpus=4)
        gpus[3].health = GpuHealth.UNHEALTHY
        draining, _ = await factories.node(s, gpus=2, site="dc2")
        draining.state = NodeState.DRAINING
        running = await factories.job(
            s, org, user, gpus_per_node=2, state=JobState.RUNNING, preemptible=True
        )
        running.preempt_deadline = T0 + timedelta(seconds=30, microseconds=1)
        await factories.attempt(s, running, node, gpus[:2], start=T0, end=None)
        done = await factories.job(s, org, user, state=JobState.COMPLETED)
        closed = await factories.attempt(
            s, done, node, [gpus[2]], start=T0 - timedelta(hours=2), end=T0 - timedelta(seconds=1)
        )
        failed = await factories.job(s, org, user, state=JobState.FAILED)
        plain = await factories.job(s, org, user, submitted_at=T0 + timedelta(microseconds=7))
        plain.priority = 1.5  # explained by an earlier cycle
        held = await factories.job(s, org, user, held=True, submitted_at=T0)
        deps = {
            DependencyState.SATISFIED: [done],
            DependencyState.NEVER: [done, failed],
            DependencyState.WAITING: [done, running],
        }
        waiting: dict[DependencyState, int] = {}
        for state, parents in deps.items():
            child = await factories.job(s, org, user, gpus_per_node=2, num_nodes=2)
            s.add_all(JobDependency(job_id=child.id, depends_on_id=p.id) for p in parents)
            waiting[state] = child.id
        s.add(OrgUsage(org_id=org.id, decayed_gpu_seconds=1234.5, as_of=T0 - timedelta(hours=1)))
        await s.commit()
        pending_rows = list(
            await s.scalars(select(Job).where(Job.state == JobState.PENDING).order_by(Job.id))
        )
        closed_allocations = [
            (a.id, a.started_at, a.ended_at)
            for a in await s.scalars(select(Allocation).where(Allocation.task_id == closed.id))
        ]

    now = T0 + timedelta(minutes=5, microseconds=3)
    loaded = await _load(engine, now, previously_open=None)
    snapshot = loaded.snapshot

    assert snapshot.now == now.timestamp()
    assert snapshot.pending == tuple(
        PendingJob(
            job_id=j.id,
            org_id=j.org_id,
            user_id=j.user_id,
            gpus_per_node=j.gpus_per_node,
            nodes=j.num_nodes,
            time_limit_s=float(j.time_limit_s),
            submitted_at=j.submitted_at.timestamp(),
            gpu_type=j.gpu_type,
            site=j.site,
            priority_class=j.priority_class,
            preemptible=j.preemptible,
            held=j.held,
            dependency=next((d for d, i in waiting.items() if i == j.id), DependencyState.NONE),
        )
        for j in pending_rows
    )
    assert {p.job_id for p in snapshot.pending} == {plain.id, held.id, *waiting.values()}
    assert loaded.explained == {plain.id}

    assert snapshot.running == (
        RunningJob(
            job_id=running.id,
            org_id=org.id,
            user_id=user.id,
            gpu_type="H100",
            placements=(Placement(node_id=node.id, gpus=(0, 1)),),
            started_at=T0.timestamp(),
            time_limit_s=3600.0,
            priority_class=running.priority_class,
            preemptible=True,
            preempting=True,
            preempt_deadline=(T0 + timedelta(seconds=30, microseconds=1)).timestamp(),
        ),
    )
    by_id = {n.id: n for n in snapshot.nodes}
    assert by_id[node.id].gpus == (0, 1, 2, 3)
    assert by_id[node.id].unhealthy_gpus == frozenset({3})
    assert by_id[node.id].schedulable
    assert not by_id[draining.id].schedulable
    assert by_id[draining.id].site != by_id[node.id].site

    orgs = {o.id: o for o in snapshot.orgs}
    assert orgs[org.id].parent_id == parent_org.id
    assert orgs[parent_org.id].shares == 2.0
    assert (orgs[org.id].guaranteed, orgs[org.id].limit) == ({"H100": 2}, {"H100": 4})
    assert loaded.org_names[org.id] == org.name

    # The fold: the stored usage decayed to now, plus what was held since its as_of.
    open_ids = loaded.open_allocation_ids
    assert len(open_ids) == 2
    held_intervals = [HeldInterval(a, org.id, "H100", T0.timestamp(), None) for a in open_ids]
    closed_intervals = [
        HeldInterval(a, org.id, "H100", start.timestamp(), end.timestamp())
        for a, start, end in closed_allocations
    ]
    expected = fold_usage(
        {org.id: (1234.5, (T0 - timedelta(hours=1)).timestamp())},
        [*held_intervals, *closed_intervals],
        now.timestamp(),
        half_life_s=SETTINGS.policy.half_life_s,
        gpu_weights=dict(SETTINGS.policy.gpu_weights),
    )
    assert loaded.org_usage[org.id] == expected[org.id]
    assert orgs[org.id].usage == expected[org.id]
    assert loaded.org_usage[parent_org.id] == 0.0


async def test_allocations_closed_since_the_last_fold_are_folded_once(
    engine: AsyncEngine,
) -> None:
    maker = make_sessionmaker(engine)
    async with maker() as s:
        org = await factories.org(s)
        user = await factories.user(s, org)
        node, gpus = await factories.node(s, gpus=2)
        job = await factories.job(s, org, user, state=JobState.RUNNING)
        task = await factories.attempt(s, job, node, gpus[:1], start=T0, end=None)
        await s.commit()
        allocation = await s.scalar(select(Allocation).where(Allocation.task_id == task.id))
        assert allocation is not None
    first = await _load(engine, T0 + timedelta(seconds=10), previously_open=None)
    assert first.open_allocation_ids == {allocation.id}

    async with maker() as s:
        allocation = await s.get(Allocation, allocation.id)
        assert allocation is not None
        allocation.ended_at = T0 + timedelta(seconds=20, microseconds=9)
        await s.commit()
    second = await _load(
        engine, T0 + timedelta(seconds=30), previously_open=first.open_allocation_ids
    )
    assert second.open_allocation_ids == frozenset()
    assert second.snapshot.running == ()
    expected = fold_usage(
        {},
        [
            HeldInterval(
                allocation.id, org.id, "H100", T0.timestamp(), allocation.ended_at.timestamp()
            )
        ],
        (T0 + timedelta(seconds=30)).timestamp(),
        half_life_s=SETTINGS.policy.half_life_s,
        gpu_weights=dict(SETTINGS.policy.gpu_weights),
    )
    assert second.org_usage[org.id] == expected[org.id]


def test_isolation_requirement_is_inherited_down_the_tree() -> None:
    orgs = [
        (1, None, True),
        (2, 1, False),
        (3, 2, False),  # a grandchild inherits too
        (4, None, False),
        (5, 4, True),  # set below an org that does not require it
        (6, 7, False),  # a cycle (the API never makes one) ends the walk
        (7, 6, False),
    ]
    assert isolated_orgs(orgs) == {1, 2, 3, 5}
    assert isolated_orgs([(1, None, False)]) == frozenset()
