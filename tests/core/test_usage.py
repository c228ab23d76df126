"""Usage decay, fair-share factors along the tree, and recovery time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import (
    capacity_usage,
    decay_usage,
    fairshare_factor,
    interval_usage,
    recovery_time,
    tree_standing,
)
from scheduler.core.types import DAY_S, PolicyConfig, UsageInterval
from tests.core.builder import nodes, org, snapshot

H = 7 * DAY_S


def test_usage_halves_every_half_life() -> None:
    u = decay_usage({1: 1000.0}, 0.0, [], H)
    assert u[1] == pytest.approx(500.0)
    assert decay_usage({1: 1000.0}, 0.0, [], 3 * H)[1] == pytest.approx(125.0)


def test_an_interval_counts_its_decayed_integral_with_the_gpu_weight() -> None:
    # 8 GPUs of weight 2 for one hour that ended just now: about 8·2·3600 (an hour decays 0.2 %).
    iv = UsageInterval(1, "A100", 8, 0.0, 3600.0)
    u = decay_usage({}, 0.0, [iv], 3600.0, gpu_weights={"A100": 2.0})
    exact = 16 * (H / math.log(2)) * (1 - 2 ** (-3600.0 / H))
    assert u[1] == pytest.approx(exact)
    assert u[1] == pytest.approx(16 * 3600.0, rel=5e-3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 5 * DAY_S), min_size=1, max_size=6, unique=True),
    st.integers(1, 16),
)
def test_folding_running_allocations_cycle_by_cycle_equals_one_fold(
    cuts: list[float], gpus: int
) -> None:
    """Passing a running allocation every cycle with end=now never double counts."""
    end = 6 * DAY_S
    iv = UsageInterval(7, "H100", gpus, 0.0, end)
    once = decay_usage({}, 0.0, [iv], end)
    usage: dict[int, float] = {}
    at = 0.0
    for t in [*sorted(cuts), end]:
        usage = decay_usage(usage, at, [UsageInterval(7, "H100", gpus, 0.0, t)], t)
        at = t
    assert usage[7] == pytest.approx(once[7], rel=1e-9)
    assert once[7] == pytest.approx(interval_usage(gpus, 1.0, 0.0, end, end, H))


def test_factor_is_half_at_exactly_the_share_of_a_busy_cluster() -> None:
    cfg = PolicyConfig()
    cluster = nodes(4)  # 32 GPUs
    cap = capacity_usage(cluster, cfg)
    # Two orgs 1:1; org 1 used half the cluster forever: U = cap / 2, S = 1/2.
    orgs = [org(1, usage=cap / 2), org(2)]
    shares, usage, factor = tree_standing(orgs, cap)
    assert shares == {1: 0.5, 2: 0.5}
    assert factor[1] == pytest.approx(0.5)
    assert factor[2] == 1.0
    assert fairshare_factor(0.1, 0.0) == 0.0


def test_shares_and_usage_follow_the_tree() -> None:
    orgs = [
        org(1, shares=3.0),
        org(2, shares=1.0),
        org(11, parent=1, shares=1.0, usage=10.0),
        org(12, parent=1, shares=2.0, usage=20.0),
    ]
    shares, usage, _ = tree_standing(orgs, 100.0)
    assert shares[11] == pytest.approx(0.75 / 3)
    assert shares[12] == pytest.approx(0.75 * 2 / 3)
    assert usage[1] == pytest.approx(0.3)  # the programme carries its members' usage
    assert usage[2] == 0.0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from([0.0, -1.0, 0.5, 1.0, 3.0, 64.0])),
        min_size=1,
        max_size=25,
    )
)
def test_each_orgs_share_is_its_part_of_its_siblings_along_the_path(
    spec: list[tuple[int, float]],
) -> None:
    # Org i + 1's parent is drawn among the orgs before it (0: a root); wide sibling groups and
    # zero or negative shares included. Each parent's sum is taken once; this checks it against
    # the sum taken for every child, as the definition reads.
    orgs = [
        org(i + 1, parent=(p if 0 < p <= i else None), shares=s) for i, (p, s) in enumerate(spec)
    ]
    shares, _, _ = tree_standing(orgs, 10.0)
    by_id = {o.id: o for o in orgs}

    def expected(oid: int) -> float:
        o = by_id[oid]
        siblings = [x for x in orgs if x.parent_id == o.parent_id]
        total = sum(max(0.0, x.shares) for x in siblings)
        own = max(0.0, o.shares) / total if total > 0 else 0.0
        return own * (expected(o.parent_id) if o.parent_id is not None else 1.0)

    assert shares == {o.id: expected(o.id) for o in orgs}


def test_recovery_time_is_when_the_factor_gets_back_to_the_target() -> None:
    cluster = nodes(4)
    cap = capacity_usage(cluster, PolicyConfig())
    s = snapshot(nodes=cluster, orgs=[org(1, usage=cap), org(2)], now=1000.0)
    # Org 1 used the whole cluster's worth with half the shares: F = 2^-2 = 0.25.
    when = recovery_time(s, 1, 0.5)
    assert when is not None
    assert when == pytest.approx(1000.0 + H)  # usage must halve: one half-life
    assert recovery_time(s, 2, 0.5) == 1000.0  # already there
    assert recovery_time(s, 1, 1.0) is None  # never exactly 1 with usage left
    assert recovery_time(s, 42, 0.5) is None  # unknown org


def test_fair_tree_ranks_whole_subtrees_before_their_members() -> None:
    from scheduler.core.usage import fair_tree_factors

    # Programme 1 over-used (all in member 11); programme 2 used little, all in member 21.
    orgs = [
        org(1),
        org(2),
        org(11, parent=1, usage=900.0),
        org(12, parent=1),
        org(21, parent=2, usage=100.0),
        org(22, parent=2, usage=0.0),
    ]
    shares, usage, classic = tree_standing(orgs, 10_000.0)
    tree = fair_tree_factors(orgs, shares, usage)
    # Classic: the idle member 12 of the greedy programme beats the busy member 21.
    assert classic[12] > classic[21]
    # Fair Tree: programme 2's whole subtree ranks first, then programme 1's.
    order = sorted(tree, key=lambda o: -tree[o])
    assert order == [2, 22, 21, 1, 12, 11]
    assert tree[2] == 1.0
    assert tree[11] == pytest.approx(1 / 6)


def test_fair_tree_ordering_is_used_when_configured() -> None:
    from scheduler.core import schedule
    from tests.core.builder import job

    orgs = [
        org(1),
        org(2),
        org(11, parent=1, guaranteed=8, usage=0.0),
        org(21, parent=2, guaranteed=8, usage=5e5),
        org(12, parent=1, usage=5e7),
    ]
    s = snapshot(nodes=nodes(1), orgs=orgs, pending=[job(1, 11, 8), job(2, 21, 8)])
    assert [st.job_id for st in schedule(s).starts] == [1]
    tree = snapshot(
        nodes=nodes(1),
        orgs=orgs,
        pending=[job(1, 11, 8), job(2, 21, 8)],
        fairshare_algorithm="fairtree",
    )
    assert [st.job_id for st in schedule(tree).starts] == [2]
