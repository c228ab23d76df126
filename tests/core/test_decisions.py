"""`Decisions`: explanations built when read, cheap reasons, a caller-owned layout cache."""

from __future__ import annotations

import threading
from dataclasses import replace

from scheduler.core import Scheduler, schedule
from scheduler.core.types import ReasonCode
from tests.core import builder as b
from tests.core.golden import CONFIGS, digest, random_snapshot


def test_reasons_are_the_first_reason_of_every_explanation_in_priority_order() -> None:
    for seed in range(30):
        config = list(CONFIGS.values())[seed % len(CONFIGS)]
        decisions = schedule(random_snapshot(seed, config))
        explained = {job_id: info.reasons[0].code for job_id, info in decisions.pending.items()}
        assert list(decisions.reasons.items()) == list(explained.items())
        assert list(decisions.reasons) == list(decisions.pending)


def test_explanations_are_built_once_when_several_threads_read_them_first() -> None:
    decisions = schedule(random_snapshot(5, CONFIGS["fairgpu"]))
    seen: list[object] = []
    barrier = threading.Barrier(4)

    def read() -> None:
        barrier.wait()
        seen.append(next(iter(decisions.pending.values())))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 4
    assert all(info is seen[0] for info in seen)  # one build: the same objects for every reader


def test_blocked_by_names_the_head_in_strict_order() -> None:
    snap = b.snapshot(
        nodes=b.nodes(2),
        orgs=[b.org(1, guaranteed=32)],
        running=[b.run(10, 1, [(2, [0])])],
        pending=[b.job(1, 1, 8, nodes=2), b.job(2, 1, 1, at=10.0)],
        ordering="fifo",
        backfill=False,
        borrowing=False,
        preemption=False,
    )
    decisions = schedule(snap)
    assert decisions.starts == ()
    assert decisions.blocked_by == 1
    assert decisions.reasons == {1: ReasonCode.RESOURCES, 2: ReasonCode.PRIORITY}
    assert decisions.pending[2].reasons[0].details["behind_job_id"] == 1


def test_a_scheduler_reuses_its_layout_only_for_the_same_nodes_tuple() -> None:
    snap = random_snapshot(11, CONFIGS["fairgpu"])
    scheduler = Scheduler()
    first = scheduler.layout(snap)
    assert scheduler.layout(replace(snap, now=5.0)) is first
    drained_id = snap.nodes[0].id
    drained = replace(
        snap,
        nodes=tuple(replace(n, schedulable=n.id != drained_id) for n in snap.nodes),
    )
    assert scheduler.layout(drained) is not first
    assert digest(scheduler.schedule(drained)) == digest(schedule(drained))
