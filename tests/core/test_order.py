"""`priority_order`: both of its sorts give the definition's order."""

from __future__ import annotations

from dataclasses import replace
from unittest.mock import patch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import order
from scheduler.core.order import priority_order
from scheduler.core.types import PendingJob, PolicyConfig

NOW = 1_000_000.0
DAY_S = 86_400.0


def by_definition(
    pending: list[PendingJob], cfg: PolicyConfig, factor: dict[int, float], total_gpus: int
) -> list[tuple[PendingJob, float]]:
    """The multifactor order as the docs define it: by (-priority, submitted_at, job_id,
    position), priority = fair share + class + age + size summed in that order."""
    top = max(cfg.priority_classes.values(), default=1) or 1
    age_max = cfg.age_max_s if cfg.age_max_s > 0 else 1.0
    keyed = []
    for i, j in enumerate(pending):
        age = NOW - j.submitted_at
        size = j.gpus_per_node * j.nodes
        prio = (
            cfg.weight_fairshare * factor.get(j.org_id, 0.0)
            + cfg.weight_class * cfg.priority_classes.get(j.priority_class, 0) / top
            + (
                cfg.weight_age
                if age >= age_max
                else (age * (cfg.weight_age / age_max) if age > 0 else 0.0)
            )
            + (cfg.weight_size if size >= total_gpus else size * (cfg.weight_size / total_gpus))
        )
        keyed.append((-prio, j.submitted_at, j.job_id, i))
    keyed.sort()
    return [(pending[k[3]], -k[0]) for k in keyed]


@st.composite
def queues(draw: st.DrawFn) -> list[PendingJob]:
    """Queues with many equal priorities: few orgs and shapes, ages beyond `age_max_s` (all
    equal in the age term), repeated submit times and, in positions, ids out of order."""
    count = draw(st.integers(0, 60))
    ids = draw(st.permutations(list(range(1, count + 1))))
    jobs = []
    for job_id in ids:
        jobs.append(
            PendingJob(
                job_id=job_id,
                org_id=draw(st.integers(1, 3)),
                user_id=1,
                gpus_per_node=draw(st.sampled_from([1, 2, 8])),
                nodes=draw(st.sampled_from([1, 1, 2])),
                time_limit_s=3600.0,
                submitted_at=NOW - draw(st.sampled_from([0.0, 10.0, 10.0, 9 * DAY_S, 30 * DAY_S])),
                priority_class=draw(st.sampled_from(["low", "normal", "high", "unknown"])),
            )
        )
    return jobs


# Generating long queues is slow on a loaded machine (CI beside other work): no deadline, and
# no health check on the draws' speed.
LOADED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@LOADED
@given(queues(), st.dictionaries(st.integers(1, 3), st.sampled_from([0.0, 0.25, 0.5, 1.0])))
def test_the_order_is_the_definitions(pending: list[PendingJob], factor: dict[int, float]) -> None:
    """Both ways of sorting: tuples (short queues) and positions by priority (long ones)."""
    cfg = PolicyConfig()
    want = [(j.job_id, p) for j, p in by_definition(pending, cfg, factor, 64)]
    for long_from in (order._SORT_POSITIONS_FROM, 0):
        with patch.object(order, "_SORT_POSITIONS_FROM", long_from):
            got = priority_order(pending, cfg, NOW, factor, 64)
        assert [(j.job_id, p) for j, p in got] == want, long_from


@LOADED
@given(
    queues(),
    st.sampled_from(["fifo", "multifactor"]),
    st.sampled_from([0.0, 500.0, 5_000.0]),
    st.booleans(),
)
def test_inside_an_org_a_higher_class_comes_first_when_classes_preempt(
    pending: list[PendingJob], ordering: str, weight_class: float, preemption: bool
) -> None:
    """Each org's jobs take the places its jobs had, higher class first, a class's jobs in
    their order; other orgs keep their places. Without preemption the order is as defined."""
    cfg = PolicyConfig(ordering=ordering, weight_class=weight_class, preemption=preemption)
    factor = {1: 0.25, 2: 0.5, 3: 1.0}
    plain = replace(cfg, preemption=False)
    before = [j for j, _ in priority_order(pending, plain, NOW, factor, 64)]
    got = [j for j, _ in priority_order(pending, cfg, NOW, factor, 64)]
    if not preemption:
        assert got == before
        return
    cls = cfg.priority_classes
    for org_id in {j.org_id for j in pending}:
        mine = [i for i, j in enumerate(got) if j.org_id == org_id]
        assert mine == [i for i, j in enumerate(before) if j.org_id == org_id]
        classes = [cls.get(got[i].priority_class, 0) for i in mine]
        assert classes == sorted(classes, reverse=True)
        for c in set(classes):
            assert [j for j in got if j.org_id == org_id and cls.get(j.priority_class, 0) == c] == [
                j for j in before if j.org_id == org_id and cls.get(j.priority_class, 0) == c
            ]
