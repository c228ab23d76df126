"""A borrower that fits nowhere gathers a mostly idle node from a few small borrowers (#19 item 2).

Docs: docs/SCHEDULING.md section 7, "Consolidation". The bound: on every node it frees, the
victims hold no more GPUs than lie idle there, each checkpointed during its run and loses at
most `consolidate_max_lost_s` of work, no victim org drops below its guarantee, and none ends
below the preemptor's weighted share; the preemptor has waited `consolidate_after_s`; and the
org whose pending work waits longest gives no job to another org's consolidation.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import schedule
from scheduler.core.preempt import work_lost_s
from scheduler.core.types import Org, PolicyConfig, PreemptionReason, RunningJob, Snapshot
from tests.core.builder import job, nodes, org, run, snapshot

HOUR_S = 3_600.0
WAITED = -HOUR_S - 60.0  # submitted past consolidate_after_s (1 h)
EVERY_30_MIN = {"preemptible": True, "checkpoint_interval_s": 1_800.0}


def busy(node: int, gpus: range, first_id: int, org_id: int = 1, **kw: object) -> list[RunningJob]:
    """1-GPU borrowers on `gpus` of `node`, two hours old, checkpointed 10 s ago."""
    options = {**EVERY_30_MIN, "started": -2 * HOUR_S - 10.0, **kw}
    return [run(first_id + g, org_id, [(node, [g])], **options) for g in gpus]


def cluster(
    *,
    on_node_1: range = range(1),
    started_1: float = -2 * HOUR_S - 10.0,
    orgs: list[Org] | None = None,
    submitted: float = WAITED,
    **kw: object,
) -> Snapshot:
    """Node 1 holds a few of org 1's borrowers, node 2 is full of them; org 2 wants 8 GPUs."""
    return snapshot(
        nodes=nodes(2),
        orgs=orgs or [org(1), org(2)],
        running=busy(1, on_node_1, 100, started=started_1) + busy(2, range(8), 200),
        pending=[job(1, 2, 8, at=submitted, preemptible=True)],
        **{"consolidate": True, **kw},
    )


def test_a_borrower_that_fits_nowhere_moves_the_one_job_off_a_mostly_idle_node() -> None:
    d = schedule(cluster())
    assert [(p.job_id, p.reason, p.preemptor_job_id) for p in d.preemptions] == [
        (100, PreemptionReason.CONSOLIDATE, 1)
    ]
    assert d.starts == ()
    assert d.pending[1].reasons[0].code.value == "Preempting"


def test_a_borrower_moves_nothing_before_it_has_waited_consolidate_after_s() -> None:
    # Node 1 may well free whole by itself within the hour: no move for a job this fresh.
    assert schedule(cluster(submitted=-HOUR_S + 1.0)).preemptions == ()
    assert len(schedule(cluster(submitted=-HOUR_S)).preemptions) == 1
    assert len(schedule(cluster(submitted=-60.0, consolidate_after_s=0.0)).preemptions) == 1


def test_victims_may_hold_as_many_gpus_as_lie_idle_but_no_more() -> None:
    assert len(schedule(cluster(on_node_1=range(4))).preemptions) == 4
    assert schedule(cluster(on_node_1=range(5))).preemptions == ()


def test_a_victim_that_would_lose_more_than_the_bound_stays() -> None:
    # Checkpointed 20 min ago: a kill at now + grace loses 20.5 min, past the 15 min bound.
    late = cluster(started_1=-3_000.0)
    assert work_lost_s(late.running[0], 30.0) == 1_230.0
    assert schedule(late).preemptions == ()
    allowed = cluster(started_1=-3_000.0, consolidate_max_lost_s=1_230.0)
    assert len(schedule(allowed).preemptions) == 1


def test_a_job_that_has_not_checkpointed_in_this_run_is_never_moved() -> None:
    # Started 20 min ago with 30 min checkpoints: nothing saved yet, a move would undo its run.
    assert schedule(cluster(started_1=-1_200.0, consolidate_max_lost_s=3_600.0)).preemptions == ()
    # No checkpoint known (the server's jobs): never moved, however young.
    s = cluster()
    unknown = [
        r if r.job_id != 100 else run(100, 1, [(1, [0])], preemptible=True, started=-700.0)
        for r in s.running
    ]
    blind = Snapshot(s.now, s.nodes, s.orgs, tuple(unknown), s.pending, s.config)
    assert schedule(blind).preemptions == ()


def test_no_victim_org_falls_below_its_guarantee_or_the_preemptors_share() -> None:
    # Org 1 is guaranteed all 9 GPUs it holds: moving one would take it below.
    assert schedule(cluster(orgs=[org(1, guaranteed=9), org(2)])).preemptions == ()
    # Org 2 already borrows 8 GPUs elsewhere (node 3): 16 borrowed against org 1's 9.
    s = cluster(orgs=[org(1), org(2)])
    third = nodes(3)
    theirs = busy(3, range(8), 300, org_id=2)
    crowded = Snapshot(s.now, third, s.orgs, s.running + tuple(theirs), s.pending, s.config)
    assert schedule(crowded).preemptions == ()


def test_off_by_default_and_switched_off_or_without_preemption_nothing_moves() -> None:
    assert schedule(cluster(consolidate=False)).preemptions == ()
    s = cluster()
    default = Snapshot(s.now, s.nodes, s.orgs, s.running, s.pending, PolicyConfig())
    assert schedule(default).preemptions == ()
    assert [p.job_id for p in schedule(cluster()).preemptions] == [100]
    assert schedule(cluster(preemption=False)).preemptions == ()


def test_the_org_whose_work_waits_longest_gives_no_job_to_another_orgs() -> None:
    # Org 1 also waits, for a 16-GPU gang that fits nowhere: submitted before org 2's job, org 1
    # is the tenant whose work waits longest, and its job on node 1 stays where it is.
    def with_gang(at: float) -> Snapshot:
        s = cluster()
        gang = job(2, 1, 8, nodes=2, at=at, preemptible=True)
        return Snapshot(s.now, s.nodes, s.orgs, s.running, (*s.pending, gang), s.config)

    assert [p.job_id for p in schedule(with_gang(WAITED - 60.0)).preemptions] == []
    # Submitted after org 2's job, org 2 waits longest: org 1's job moves as before.
    assert [p.job_id for p in schedule(with_gang(WAITED + 60.0)).preemptions] == [100]


def test_its_own_jobs_of_no_higher_class_may_move_for_it() -> None:
    own = snapshot(
        nodes=nodes(2),
        orgs=[org(1), org(2)],
        running=busy(1, range(2), 100, org_id=2) + busy(2, range(8), 200),
        pending=[job(1, 2, 8, at=WAITED, preemptible=True, priority_class="low")],
        consolidate=True,
    )
    assert schedule(own).preemptions == ()  # its jobs are "normal", above its "low"
    same = snapshot(
        nodes=own.nodes,
        orgs=own.orgs,
        running=own.running,
        pending=[job(1, 2, 8, at=WAITED, preemptible=True)],
        consolidate=True,
    )
    assert [p.job_id for p in schedule(same).preemptions] == [100, 101]


@st.composite
def fragmented(draw: st.DrawFn) -> Snapshot:
    """Three orgs' small borrowers scattered over four nodes; gangs and 8-GPU jobs waiting."""
    running: list[RunningJob] = []
    job_id = 100
    for node in range(1, 5):
        used = 0
        while used < draw(st.integers(0, 8)):
            size = draw(st.integers(1, min(4, 8 - used)))
            running.append(
                run(
                    job_id,
                    draw(st.integers(1, 3)),
                    [(node, range(used, used + size))],
                    preemptible=draw(st.sampled_from([True, True, True, False])),
                    started=-draw(st.floats(0.0, 3 * HOUR_S)),
                    checkpoint_interval_s=draw(st.sampled_from([0.0, 1_800.0, 1_800.0])),
                )
            )
            used += size
            job_id += 1
    pending = [
        job(
            i,
            draw(st.integers(1, 3)),
            draw(st.sampled_from([2, 4, 8])),
            preemptible=True,
            at=-draw(st.floats(0.0, 2 * HOUR_S)),
        )
        for i in range(1, draw(st.integers(1, 4)) + 1)
    ]
    guarantees = [draw(st.sampled_from([0, 0, 2, 8])) for _ in range(3)]
    orgs = [org(i + 1, guaranteed=g) for i, g in enumerate(guarantees)]
    return snapshot(
        nodes=nodes(4),
        orgs=orgs,
        running=running,
        pending=pending,
        consolidate=True,
        consolidate_after_s=draw(st.sampled_from([0.0, HOUR_S])),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragmented())
def test_consolidation_never_takes_more_than_lies_idle_nor_more_than_the_bound(
    s: Snapshot,
) -> None:
    d = schedule(s)
    moved = [p for p in d.preemptions if p.reason is PreemptionReason.CONSOLIDATE]
    by_id = {r.job_id: r for r in s.running}
    held = {n.id: 0 for n in s.nodes}
    for r in s.running:
        for p in r.placements:
            held[p.node_id] += len(p.gpus)
    taken: dict[int, int] = {}
    kill_at = s.now + s.config.preemption_grace_s
    for p in moved:
        victim = by_id[p.job_id]
        assert victim.preemptible
        assert s.now - victim.started_at >= s.config.min_runtime_s
        assert work_lost_s(victim, kill_at) <= s.config.consolidate_max_lost_s
        # It checkpointed during this run: a move never undoes a whole run.
        assert victim.checkpoint_interval_s
        assert kill_at - victim.started_at >= victim.checkpoint_interval_s
        for placement in victim.placements:
            taken[placement.node_id] = taken.get(placement.node_id, 0) + len(placement.gpus)
    for node_id, gpus in taken.items():
        assert gpus <= 8 - held[node_id]  # no more than lay idle on the node
    # A consolidating job is a borrower: it starts nothing on the GPUs it frees this cycle.
    preemptors = {p.preemptor_job_id for p in moved}
    submitted = {j.job_id: j.submitted_at for j in s.pending}
    for preemptor in preemptors:
        assert s.now - submitted[preemptor] >= s.config.consolidate_after_s
    assert not preemptors & {st_.job_id for st_ in d.starts}
    # The org whose pending work waits longest gives no job to another org's consolidation.
    if moved:
        first = min(s.pending, key=lambda j: (j.submitted_at, j.job_id))
        by_job = {j.job_id: j.org_id for j in s.pending}
        for p in moved:
            victim_org = by_id[p.job_id].org_id
            assert victim_org != first.org_id or by_job[p.preemptor_job_id] == victim_org
