"""One-node jobs go where their end does not delay a node's freeing whole (#19 item 2)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import schedule
from scheduler.core.types import Snapshot
from tests.core.builder import job, nodes, org, run, snapshot

HOUR_S = 3_600.0


def _cluster(pending_limit_s: float, **config: object) -> Snapshot:
    # Node 1: 7 GPUs busy for one more hour (1 free). Node 2: 5 GPUs busy for ten hours (3
    # free). Node 3: empty.
    return snapshot(
        nodes=nodes(3),
        orgs=[org(1, guaranteed=24)],
        running=[
            run(100, 1, [(1, range(7))], limit_s=HOUR_S),
            run(101, 1, [(2, range(5))], limit_s=10 * HOUR_S),
        ],
        pending=[job(1, 1, 1, limit_s=pending_limit_s)],
        **config,
    )


def _node_of(s: Snapshot, job_id: int) -> int:
    (start,) = [x for x in schedule(s).starts if x.job_id == job_id]
    (placement,) = start.placements
    return placement.node_id


def test_a_job_goes_where_jobs_end_after_it_not_on_the_tightest_node() -> None:
    # Five hours on node 1 would keep it busy four hours past its last job; node 2 is busy for
    # ten hours anyway. Best fit would take node 1.
    assert _node_of(_cluster(5 * HOUR_S), 1) == 2
    assert _node_of(_cluster(5 * HOUR_S, pack_by_end=False), 1) == 1


def test_among_nodes_busy_longer_the_tightest_takes_it() -> None:
    # Thirty minutes fits inside both nodes' last ends: best fit decides (node 1).
    assert _node_of(_cluster(HOUR_S / 2), 1) == 1


def test_when_it_outlasts_every_node_it_delays_the_one_draining_last() -> None:
    # Twenty hours outlasts both: on node 2 it delays that node's freeing by 10 h, on node 1 by
    # 19 h. The empty node stays empty.
    assert _node_of(_cluster(20 * HOUR_S), 1) == 2


def test_an_empty_node_is_taken_only_when_no_used_node_has_room() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16)],
        running=[run(100, 1, [(1, range(8))], limit_s=10 * HOUR_S)],
        pending=[job(1, 1, 2, limit_s=HOUR_S)],
    )
    assert _node_of(s, 1) == 2


@settings(max_examples=60, deadline=None)
@given(
    busy=st.lists(
        st.tuples(st.integers(1, 7), st.integers(1, 48)), min_size=1, max_size=6
    ),  # per node: GPUs busy, hours left
    gpus=st.integers(1, 8),
    hours=st.integers(1, 48),
)
def test_it_never_delays_a_node_when_one_it_would_not_delay_has_room(
    busy: list[tuple[int, int]], gpus: int, hours: int
) -> None:
    running = [
        run(100 + i, 1, [(i + 1, range(used))], limit_s=left * HOUR_S)
        for i, (used, left) in enumerate(busy)
    ]
    s = snapshot(
        nodes=nodes(len(busy) + 1),
        orgs=[org(1, guaranteed=8 * (len(busy) + 1))],
        running=running,
        pending=[job(1, 1, gpus, limit_s=hours * HOUR_S)],
    )
    room = [i + 1 for i, (used, _left) in enumerate(busy) if 8 - used >= gpus]
    inside = [i + 1 for i, (used, left) in enumerate(busy) if 8 - used >= gpus and left >= hours]
    node = _node_of(s, 1)
    if inside:
        tightest = min(8 - busy[n - 1][0] for n in inside)
        assert node in inside
        assert 8 - busy[node - 1][0] == tightest
    elif room:
        assert node in room
        assert busy[node - 1][1] == max(busy[n - 1][1] for n in room)
    else:
        assert node == len(busy) + 1  # the empty node
