"""Node features a job needs (agent capabilities, strict isolation), scenario by scenario: a job
is placed, given a reservation and freed GPUs only on nodes having every feature it needs."""

from __future__ import annotations

from dataclasses import replace

from scheduler.core import schedule
from scheduler.core.types import Node, ReasonCode
from tests.core.builder import job, nodes, org, run, snapshot

SIGNAL = frozenset({"signal"})
PTY = frozenset({"pty"})


def _cluster() -> tuple[Node, ...]:
    """Node 1: a tight 2-GPU node whose agent does nothing extra; node 2: 8 GPUs, every
    capability; node 3: 8 GPUs, terminals only."""
    small, big, other = nodes(3)
    return (
        replace(small, gpus=(0, 1), capabilities=frozenset()),
        big,
        replace(other, capabilities=PTY),
    )


def test_a_job_goes_to_a_node_with_its_capabilities_not_the_tightest() -> None:
    snap = snapshot(
        nodes=_cluster(),
        orgs=[org(1, guaranteed=32)],
        pending=[
            job(1, 1, 2, capabilities=SIGNAL),
            job(2, 1, 2, capabilities=SIGNAL | PTY),
            job(3, 1, 2),
        ],
        pack_by_end=False,  # best fit: job 3, which needs nothing, takes the tight node
    )
    d = schedule(snap)
    where = {s.job_id: s.placements[0].node_id for s in d.starts}
    assert where == {1: 2, 2: 2, 3: 1}


def test_with_no_capable_node_the_job_waits_with_numbers() -> None:
    snap = snapshot(
        nodes=_cluster()[:1] + _cluster()[2:],
        orgs=[org(1, guaranteed=32)],
        pending=[job(1, 1, 2, capabilities=SIGNAL), job(2, 1, 2, capabilities=PTY, nodes=2)],
    )
    d = schedule(snap)
    assert d.starts == ()
    (reason,) = d.pending[1].reasons
    assert reason.code == ReasonCode.RESOURCES
    assert reason.details["capabilities"] == "signal"
    assert reason.details["capable_nodes"] == 0
    assert "agent can do signal" in reason.message
    assert d.pending[1].estimated_start is None
    # One terminal node exists, but not two: the gang cannot ever fit on capable nodes.
    (reason,) = d.pending[2].reasons
    assert (reason.details["capabilities"], reason.details["capable_nodes"]) == ("pty", 1)


def test_a_busy_capable_node_is_waited_for_and_reserved_not_the_idle_one() -> None:
    snap = snapshot(
        nodes=_cluster(),
        orgs=[org(1, guaranteed=32)],
        running=[run(10, 1, [(2, range(8))], limit_s=600.0), run(11, 1, [(3, range(8))])],
        pending=[job(1, 1, 2, capabilities=SIGNAL), job(2, 1, 2, limit_s=60.0)],
    )
    d = schedule(snap)
    assert [(s.job_id, s.placements[0].node_id) for s in d.starts] == [(2, 1)]
    info = d.pending[1]
    assert info.reasons[0].code == ReasonCode.RESOURCES
    assert info.reasons[0].details["capabilities"] == "signal"
    assert info.reasons[0].details["reservation_start"] == 600.0  # node 2 frees first
    assert info.estimated_start == 600.0


def test_reclaim_preempts_only_on_nodes_the_job_could_use() -> None:
    """The borrower on the incapable node is the cheaper victim (fewer GPUs), but the owner's
    signal job could not run there: the one on the capable node is preempted."""
    snap = snapshot(
        nodes=_cluster(),
        orgs=[org(1, guaranteed=8), org(2, guaranteed=0)],
        running=[
            run(10, 2, [(1, range(2))], preemptible=True),
            run(11, 2, [(2, range(8))], preemptible=True),
            run(12, 2, [(3, range(8))], preemptible=True),
        ],
        pending=[job(1, 1, 2, capabilities=SIGNAL)],
        min_runtime_s=0.0,
    )
    d = schedule(snap)
    assert [p.job_id for p in d.preemptions] == [11]
    # Without the need, the cheapest victim goes.
    plain = schedule(replace(snap, pending=(job(1, 1, 2),)))
    assert [p.job_id for p in plain.preemptions] == [10]
