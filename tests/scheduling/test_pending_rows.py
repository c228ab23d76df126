"""Which explanations a cycle writes, and that a cycle with none to write builds none."""

from __future__ import annotations

from scheduler.core import schedule
from scheduler.core.explain import BuiltOnRead
from scheduler.services.scheduling.apply import _pending_rows
from tests.core.golden import CONFIGS, random_snapshot


def test_a_cycle_with_no_new_job_builds_no_explanation() -> None:
    decisions = schedule(random_snapshot(4, CONFIGS["fairgpu"]))
    waiting = set(decisions.reasons)
    assert waiting
    assert _pending_rows(decisions, waiting, set(), everything=False) == []
    assert isinstance(decisions.pending, BuiltOnRead)
    assert not decisions.pending.built


def test_new_jobs_each_cycle_and_every_job_when_everything_is_due() -> None:
    decisions = schedule(random_snapshot(4, CONFIGS["fairgpu"]))
    waiting = sorted(decisions.reasons)
    new, old = waiting[:3], set(waiting[3:])
    rows = _pending_rows(decisions, old, set(), everything=False)
    assert [row[0] for row in rows] == new
    started = {waiting[0]}
    rows = _pending_rows(decisions, old, started, everything=True)
    assert [row[0] for row in rows] == waiting[1:]
    info = decisions.pending[waiting[1]]
    assert rows[0][1] == info.priority
    assert f'"code": "{info.reasons[0].code.value}"' in rows[0][2]
    assert isinstance(decisions.pending, BuiltOnRead)
    assert decisions.pending.built
