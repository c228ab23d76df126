"""A node's drain time, gathered in the cycle's pass over running jobs, is its release profile's
last entry (what `pack_by_end` reads), before and after the cycle's own starts (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core.backfill import Reservations
from scheduler.core.capacity import Layout
from scheduler.core.cycle import Cycle
from scheduler.core.types import Snapshot
from tests.core.builder import nodes, org, run, snapshot
from tests.core.test_properties import snapshots


def _last_release(res: Reservations, nid: int) -> float:
    """The definition: the latest end in the node's built release profile; now if none."""
    rel = res._releases if res._releases is not None else res._build()
    ends = rel.get(nid)
    return ends[-1][0] if ends else res.now


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.randoms(use_true_random=False), st.booleans())
def test_drains_at_is_the_release_profiles_last_end(
    snap: Snapshot, rnd: random.Random, built_first: bool
) -> None:
    res = Cycle(snap, Layout(snap.nodes)).res
    if built_first:  # starts then go into the built profiles, not the late list
        res._build()
    node_ids = [n.id for n in snap.nodes] + [r.placements[0].node_id for r in snap.running]
    for _ in range(rnd.randint(0, 5)):
        nid = rnd.choice(node_ids)
        res.note_start(nid, rnd.randint(1, 8), snap.now + rnd.choice([60.0, 3_600.0, 1e6]))
    for nid in node_ids:
        assert res.drains_at(nid) == _last_release(res, nid), nid


def test_a_job_past_its_limit_drains_now() -> None:
    """A running job whose limit has passed counts as ending now, as in the profile."""
    snap = snapshot(
        nodes=nodes(1), orgs=[org(1, guaranteed=8)], running=[run(1, 1, [(1, range(2))])]
    )
    late = snap.now + 10 * 86_400.0
    res = Cycle(Snapshot(late, snap.nodes, snap.orgs, snap.running, ()), Layout(snap.nodes)).res
    assert res.drains_at(1) == late == _last_release(res, 1)
