"""Running-job tables kept by a `Scheduler` and corrected by delta equal tables built anew."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import Scheduler, schedule
from scheduler.core.occupied import Occupied
from scheduler.core.running import RunningTables
from scheduler.core.types import Placement, RunningChanges, RunningJob, Snapshot
from tests.core.golden import digest
from tests.core.test_properties import advance, snapshots


def changes(old: tuple[RunningJob, ...], new: tuple[RunningJob, ...]) -> RunningChanges:
    """What a caller that tracks its jobs would say: started or replaced objects, ids gone."""
    before = {r.job_id: r for r in old}
    ids = {r.job_id for r in new}
    put = tuple(r for r in new if before.get(r.job_id) is not r)
    return RunningChanges(old, put, tuple(j for j in before if j not in ids))


def tables(run: RunningTables) -> dict[str, object]:
    """The tables in a form that does not depend on the order jobs were added in."""
    return {
        "held": {nid: sorted(g) for nid, g in run.held.items()},
        "drains": dict(run.drains),
        "booked": {k: n for k, n in run.booked.items() if n},
        "leaving": {k: n for k, n in run.leaving.items() if n},
        "preempting": {j: id(r) for j, r in run.preempting.items()},
        "aged": {k: sorted((r.job_id, id(r), n) for r, n in g) for k, g in run.aged.items()},
        "aged_classes": dict(run.aged_classes),
    }


def occupied(occ: Occupied) -> dict[str, object]:
    """What the free index reads of it: free GPUs, counts, and the heaps' live entries (those
    under the count the node has now; the rest are stale and skipped)."""
    free = occ.free
    live = [[sorted({n for n in h if free[n] == f}) for f, h in enumerate(hs)] for hs in occ.heaps]
    gpus = {nid: sorted(g) for nid, g in occ.busy.items() if occ.layout.usable[nid] & set(g)}
    return {"free": dict(free), "cnts": occ.cnts, "live": live, "busy": gpus}


def step(s: Snapshot, what: str, rnd: random.Random) -> Snapshot:
    """Change the running jobs (and time) as a cluster would between two cycles."""
    if what == "end" and s.running:
        gone = set(rnd.sample([r.job_id for r in s.running], rnd.randint(1, len(s.running))))
        return replace(s, running=tuple(r for r in s.running if r.job_id not in gone))
    if what == "preempt" and s.running:
        r = rnd.choice(s.running)
        new = replace(r, preempting=True, preempt_deadline=s.now + rnd.choice([0.0, 30.0]))
        return replace(s, running=tuple(new if x is r else x for x in s.running))
    if what == "start":
        nodes = {n.id: n for n in s.nodes}
        used = {(p.node_id, g) for r in s.running for p in r.placements for g in p.gpus}
        node = rnd.choice(s.nodes)
        free = [g for g in node.gpus if (node.id, g) not in used]
        if free:
            # A fresh id: two jobs of one id never run at once (and the kept tables would,
            # rightly, be rebuilt for such a queue rather than corrected).
            taken = {r.job_id for r in s.running}
            job_id = 50_000 + rnd.randrange(10**6)
            while job_id in taken:
                job_id += 1
            gpus = tuple(free[: rnd.randint(1, len(free))])
            new = RunningJob(
                job_id,
                rnd.choice(s.orgs).id,
                1,
                nodes[node.id].gpu_type,
                (Placement(node.id, gpus),),
                s.now - rnd.choice([0.0, 700.0]),
                rnd.choice([600.0, 3600.0]),
                rnd.choice(["low", "normal"]),
                rnd.random() < 0.7,
            )
            return replace(s, running=(*s.running, new))
    if what == "time":
        return replace(s, now=s.now + rnd.choice([1.0, 599.0, 700.0, 1e5]))
    return s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    snapshots(),
    st.lists(st.sampled_from(["cycle", "end", "preempt", "start", "time", "same"]), max_size=12),
    st.randoms(use_true_random=False),
)
def test_tables_corrected_by_delta_equal_tables_built_anew(
    snap: Snapshot, steps: list[str], rnd: random.Random
) -> None:
    """Over random sequences of starts, ends, preemptions sent and time steps, each handed to a
    kept `Scheduler` as `running_changes`, its tables equal those built from every running job,
    and every cycle's decisions (explanations and standings included) those of a fresh one."""
    kept = Scheduler()
    s = kept_s = snap
    for what in [*steps, "cycle"]:
        d = kept.schedule(kept_s)
        assert digest(d) == digest(schedule(s)), what
        run = kept._run
        assert run is not None
        fresh = RunningTables(s.running, s.now, s.config.min_runtime_s)
        assert tables(run) == tables(fresh), what
        kept_occ = kept._occupied
        assert kept_occ is not None
        assert kept_occ[0] is run
        assert occupied(kept_occ[1]) == occupied(Occupied(kept_occ[1].layout, fresh.held)), what
        # Only the first cycle reads every running job.
        assert kept.running_built == 1, what
        old = s.running
        s = advance(s, d, 30.0) if what == "cycle" else step(s, what, rnd)
        kept_s = replace(s, running_changes=changes(old, s.running))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.randoms(use_true_random=False))
def test_changes_that_do_not_follow_the_kept_tables_rebuild_them(
    snap: Snapshot, rnd: random.Random
) -> None:
    """Another base, a job said gone that is not there, a delta that leaves the count of jobs
    wrong, or time going backwards: the tables are built anew and the decisions are a fresh
    cycle's. (A delta that is wrong but adds up cannot be told from a right one: the caller
    owes the truth, as it does for the snapshot itself.)"""
    later = step(step(snap, "end", rnd), "start", rnd)
    wrong = [
        replace(later, running_changes=RunningChanges(snap.running, (), (123_456,))),
        replace(later, now=snap.now - 1.0, running_changes=changes(snap.running, later.running)),
    ]
    if snap.running:  # an equal tuple that is not the one the tables describe (() is one)
        copy = (*snap.running,)  # a new tuple object, equal
        wrong.append(replace(later, running_changes=changes(copy, later.running)))
    if len(later.running) != len(snap.running):
        wrong.append(replace(later, running_changes=RunningChanges(snap.running)))
    for bad in wrong:
        kept = Scheduler()
        kept.schedule(snap)
        assert digest(kept.schedule(bad)) == digest(schedule(bad))
        assert kept.running_built == 2
        run = kept._run
        assert run is not None
        assert tables(run) == tables(RunningTables(bad.running, bad.now, bad.config.min_runtime_s))
