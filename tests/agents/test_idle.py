"""The idle timeout's bookkeeping (agents/idle.py) on a clock of the test's own, and what a task
says of its simulated GPUs (Runner.driven_utilization): only its own GPUs, only from a plain
file in its own home."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from agents.gpu import SimulatedBackend, parse_simulate_spec
from agents.gpu.simulated import SIMULATED_UTILIZATION_FILE
from agents.idle import OTHER_RANKS_BUSY_S, IdleWatch, human_s, warning_lead_s
from agents.runner import Runner
from agents.state import StateDir, TaskRecord
from tests.agents.helpers import spec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _running(task_id: int, gpus: list[int], idle_timeout_s: float | None = 100.0) -> TaskRecord:
    record = TaskRecord(spec=spec(task_id, pty=True, gpus=gpus, idle_timeout_s=idle_timeout_s))
    record.state = "running"
    record.started_at = dt.datetime.now(dt.UTC)
    return record


def test_warned_once_then_ended_unless_used() -> None:
    clock = Clock()
    watch = IdleWatch(clock)
    quiet, typed, untimed = _running(1, [0]), _running(2, [1]), _running(3, [2], None)
    tasks = [quiet, typed, untimed]
    assert watch.due(tasks) == []  # first seen: counting starts now
    clock.now += 100 - warning_lead_s(100)
    assert [(r.task_id, a) for r, a in watch.due(tasks)] == [(1, "warn"), (2, "warn")]
    watch.warned(1)
    watch.warned(2)
    watch.touch(2)  # input to task 2: its idle time starts again, and a new warning may come
    clock.now += 1
    assert watch.due(tasks) == []  # task 1 is not warned twice
    clock.now += warning_lead_s(100)
    assert [(r.task_id, a) for r, a in watch.due(tasks)] == [(1, "end")]
    clock.now += 100
    assert [(r.task_id, a) for r, a in watch.due(tasks)] == [(1, "end"), (2, "end")]


def test_busy_gpus_count_as_use_only_for_their_own_task() -> None:
    clock = Clock()
    watch = IdleWatch(clock)
    first, second = _running(1, [0]), _running(2, [1])
    watch.due([first, second])
    clock.now += 100
    backend = SimulatedBackend(parse_simulate_spec("2xH100"))
    samples = backend.sample({0: [10], 1: [20]}, {0: 0.9, 1: 0.0})
    watch.observe(samples, [first, second])
    assert [(r.task_id, a) for r, a in watch.due([first, second])] == [(2, "end")]


def test_other_ranks_gpu_use_counts_only_as_a_rise_and_the_unknown_as_use() -> None:
    clock = Clock()
    watch = IdleWatch(clock)
    session = _running(1, [0])
    assert watch.needs_baseline(1)
    watch.other_ranks(1, 500.0)  # first look: where the count starts, not use
    assert not watch.needs_baseline(1)
    clock.now += 100
    watch.other_ranks(1, 500.0 + OTHER_RANKS_BUSY_S / 2)  # barely moved: not use
    assert [(r.task_id, a) for r, a in watch.due([session])] == [(1, "end")]
    watch.other_ranks(1, 500.0 + OTHER_RANKS_BUSY_S * 2)  # rank 1 worked: used now
    assert watch.due([session]) == []
    clock.now += 100
    watch.other_ranks(1, None)  # the server could not say: never ended on that
    assert watch.due([session]) == []
    unseen = _running(2, [1])
    watch.other_ranks(2, None)  # a failed first look starts the count at 0
    assert not watch.needs_baseline(2)
    clock.now += 100
    watch.other_ranks(2, 0.5)
    assert [(r.task_id, a) for r, a in watch.due([unseen])] == [(2, "end")]


def test_a_stopping_or_ended_task_is_not_due_and_is_forgotten() -> None:
    clock = Clock()
    watch = IdleWatch(clock)
    record = _running(1, [0])
    watch.due([record])
    clock.now += 1000
    record.stop_reason = "stop requested"
    assert watch.due([record]) == []
    record.stop_reason = None  # (not what a runner does; shows it was forgotten)
    assert watch.due([record]) == []  # counted afresh from now


def test_the_warning_lead_and_durations_read_well() -> None:
    assert warning_lead_s(6) == 1.5
    assert warning_lead_s(3600) == 300
    assert (human_s(5400), human_s(300), human_s(45), human_s(0)) == ("1h30m", "5m", "45s", "0s")


def _runner(tmp_path: Path) -> Runner:
    runner = Runner(StateDir(tmp_path / "state"))
    for task_id, gpus, pty in ((1, [0, 1], True), (2, [2], True), (3, [3], False)):
        record = _running(task_id, gpus)
        record.spec = spec(task_id, pty=pty or None, gpus=gpus)
        record.pid = os.getpid()
        runner.records[task_id] = record
        runner.confinement.task_dir(task_id).mkdir(parents=True)
    return runner


def test_a_task_drives_its_own_simulated_gpus_only(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    home = runner.confinement.task_dir
    # Unsaid: a terminal is idle, a batch task busy (the backend's default: not in the map).
    assert runner.driven_utilization() == {0: 0.0, 1: 0.0, 2: 0.0}
    (home(1) / SIMULATED_UTILIZATION_FILE).write_text("0.8\n")
    (home(3) / SIMULATED_UTILIZATION_FILE).write_text("7")  # clamped to 1
    assert runner.driven_utilization() == {0: 0.8, 1: 0.8, 2: 0.0, 3: 1.0}
    backend = SimulatedBackend(parse_simulate_spec("4xH100"))
    ratios = [
        s.utilization_ratio for s in backend.sample(runner.busy_gpus(), runner.driven_utilization())
    ]
    assert ratios == [0.8, 0.8, 0.0, 1.0]


def test_a_link_a_fifo_or_junk_says_nothing(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    home = runner.confinement.task_dir
    target = tmp_path / "elsewhere"
    target.write_text("1.0")
    (home(1) / SIMULATED_UTILIZATION_FILE).symlink_to(target)
    os.mkfifo(home(2) / SIMULATED_UTILIZATION_FILE)  # would block a reader that opened it plainly
    (home(3) / SIMULATED_UTILIZATION_FILE).write_text("nan")
    assert runner.driven_utilization() == {0: 0.0, 1: 0.0, 2: 0.0}
    (home(3) / SIMULATED_UTILIZATION_FILE).write_text("lots")
    assert 3 not in runner.driven_utilization()
