"""Memory per GPU a job needs (`--mem` over its GPUs per node), scenario by scenario: a job is
placed only on nodes whose agents give each GPU at least that much of the tasks' memory, and a
job no node could ever hold says so instead of starting on a node that refuses it."""

from __future__ import annotations

from dataclasses import replace

from scheduler.core import schedule
from scheduler.core.capacity import MEMORY_TIERS_MAX, Layout, memory_tiers
from scheduler.core.types import Node, ReasonCode
from tests.core.builder import job, nodes, org, run, snapshot

GIB = 2**30


def _cluster() -> tuple[Node, ...]:
    """Node 1: 8 GPUs, 16 GiB per GPU; node 2: 8 GPUs, 120 GiB per GPU; node 3: an agent that
    reports no share (older than the field)."""
    small, big, older = nodes(3)
    return (
        replace(small, memory_per_gpu_bytes=16 * GIB),
        replace(big, memory_per_gpu_bytes=120 * GIB),
        older,
    )


def test_a_job_goes_to_the_node_its_memory_fits() -> None:
    snap = snapshot(
        nodes=_cluster()[:2],
        orgs=[org(1, guaranteed=16)],
        pending=[job(1, 1, 2, memory_bytes=64 * GIB), job(2, 1, 2, memory_bytes=32 * GIB)],
    )
    d = schedule(snap)
    where = {s.job_id: s.placements[0].node_id for s in d.starts}
    # 64 GiB over 2 GPUs is 32 GiB per GPU: only node 2, although node 1 comes first (both
    # empty, the lower id); 32 GiB is 16 per GPU: either, and node 2 is now the tighter.
    assert where == {1: 2, 2: 2}
    plain = schedule(replace(snap, pending=(job(1, 1, 2),)))
    assert [s.placements[0].node_id for s in plain.starts] == [1]


def test_memory_is_per_node_so_a_gang_needs_it_on_every_node() -> None:
    big = replace(_cluster()[1], id=4, name="s1-n4")
    snap = snapshot(
        nodes=(*_cluster()[:2], big),
        orgs=[org(1, guaranteed=24)],
        pending=[job(1, 1, 8, nodes=2, memory_bytes=800 * GIB)],
    )
    d = schedule(snap)
    assert [sorted(p.node_id for p in s.placements) for s in d.starts] == [[2, 4]]


def test_a_node_that_reports_no_share_takes_any_job_as_before() -> None:
    snap = snapshot(
        nodes=_cluster(),
        orgs=[org(1, guaranteed=24)],
        pending=[job(1, 1, 1, memory_bytes=1024 * GIB)],
    )
    d = schedule(snap)
    assert [s.placements[0].node_id for s in d.starts] == [3]


def test_too_large_for_every_node_it_waits_saying_so() -> None:
    snap = snapshot(
        nodes=_cluster()[:2],
        orgs=[org(1, guaranteed=16)],
        pending=[job(1, 1, 2, memory_bytes=241 * GIB), job(2, 1, 8, memory_bytes=241 * GIB)],
    )
    d = schedule(snap)
    assert [s.job_id for s in d.starts] == [2]  # 30.1 GiB per GPU over 8 GPUs fits node 2
    info = d.pending[1]
    (reason,) = info.reasons
    assert reason.code == ReasonCode.BAD_CONSTRAINTS
    assert reason.details["memory_per_gpu_bytes"] == -(-241 * GIB // 2)
    assert reason.details["largest_memory_per_gpu_bytes"] == 120 * GIB
    assert "no node gives a GPU more than 120.0 GiB" in reason.message
    assert "\n" not in reason.message
    assert info.estimated_start is None


def test_a_busy_node_its_memory_fits_is_waited_for_not_the_idle_one() -> None:
    snap = snapshot(
        nodes=_cluster()[:2],
        orgs=[org(1, guaranteed=16)],
        running=[run(10, 1, [(2, range(8))], limit_s=600.0)],
        pending=[job(1, 1, 4, memory_bytes=256 * GIB), job(2, 1, 2, limit_s=60.0)],
    )
    d = schedule(snap)
    assert [(s.job_id, s.placements[0].node_id) for s in d.starts] == [(2, 1)]
    info = d.pending[1]
    assert info.reasons[0].code == ReasonCode.RESOURCES
    assert info.reasons[0].details["memory_per_gpu_bytes"] == 64 * GIB
    assert "64.0 GiB of memory per GPU" in info.reasons[0].message
    assert info.estimated_start == 600.0


def test_fewer_nodes_with_the_memory_than_the_gang_asks_is_said() -> None:
    snap = snapshot(
        nodes=_cluster()[:2],
        orgs=[org(1, guaranteed=16)],
        pending=[job(1, 1, 8, nodes=2, memory_bytes=512 * GIB)],
    )
    d = schedule(snap)
    assert d.starts == ()
    (reason,) = d.pending[1].reasons
    assert reason.code == ReasonCode.RESOURCES
    assert reason.details["memory_nodes"] == 1
    assert "giving each GPU 64.0 GiB of memory" in reason.message


def test_reclaim_preempts_only_on_nodes_the_memory_fits() -> None:
    """The borrower on the small node is the cheaper victim (fewer GPUs), but the owner's job
    could not run there: the one on the node its memory fits is preempted."""
    snap = snapshot(
        nodes=_cluster()[:2],
        orgs=[org(1, guaranteed=8), org(2, guaranteed=0)],
        running=[
            run(10, 2, [(1, range(2))], preemptible=True),
            run(11, 2, [(1, range(2, 8))], preemptible=True),
            run(12, 2, [(2, range(8))], preemptible=True),
        ],
        pending=[job(1, 1, 2, memory_bytes=100 * GIB)],
        min_runtime_s=0.0,
    )
    d = schedule(snap)
    assert [p.job_id for p in d.preemptions] == [12]
    plain = schedule(replace(snap, pending=(job(1, 1, 2),)))
    assert [p.job_id for p in plain.preemptions] == [10]


def test_many_distinct_shares_make_few_tiers_and_no_wrong_start() -> None:
    """Nodes of one model whose shares differ by a little (another firmware keeps a few MiB
    more) each made a tier and a feature class of their own: 4,096 of them took the layout
    four minutes. Shares within a small tolerance now count as the lowest of them; the largest
    share stays exact."""
    spread = tuple(
        replace(n, memory_per_gpu_bytes=100 * GIB + i * 64 * 2**20)
        for i, n in enumerate(nodes(40, gpus=1))
    )
    (big,) = nodes(1, gpus=1, first_id=41)
    cluster = (*spread, replace(big, memory_per_gpu_bytes=200 * GIB))
    layout = Layout(cluster)
    assert len(layout.tiers) <= MEMORY_TIERS_MAX + 1
    assert (layout.tiers[0], layout.tiers[-1]) == (100 * GIB, 200 * GIB)
    assert len(layout.class_nodes) <= MEMORY_TIERS_MAX + 2
    snap = snapshot(
        nodes=cluster,
        orgs=[org(1, guaranteed=41)],
        pending=[
            job(1, 1, 1, memory_bytes=200 * GIB),
            job(2, 1, 1, memory_bytes=200 * GIB + 1),
            *(job(3 + i, 1, 1, memory_bytes=100 * GIB + i * 2**30) for i in range(4)),
        ],
    )
    d = schedule(snap)
    share = {n.id: n.memory_per_gpu_bytes or 0 for n in cluster}
    asked = {j.job_id: j.memory_bytes or 0 for j in snap.pending}
    started = {s.job_id: s.placements[0].node_id for s in d.starts}
    assert started[1] == 41
    assert all(asked[j] <= share[nid] for j, nid in started.items())
    assert started.keys() >= {1, 3}  # 100 GiB fits every spread node
    assert d.pending[2].reasons[0].code == ReasonCode.BAD_CONSTRAINTS


def test_memory_tiers_keep_the_lowest_and_largest_share() -> None:
    assert memory_tiers([3, 1, 2, 2]) == [1, 2, 3]
    shares = [2**30 + i for i in range(1000)] + [2**31 + i for i in range(1000)] + [2**40]
    tiers = memory_tiers(shares)
    assert tiers == [2**30, 2**31, 2**40]
    assert set(tiers) <= set(shares)
