"""The heartbeat's classifier (scheduler/services/heartbeat/classify.py): quiet or full, pure."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.agent import Heartbeat
from scheduler.services.heartbeat.classify import Verdict, classify
from scheduler.services.heartbeat.read import NodeTaskRow

IDLE = [NodeTaskRow("ready", None, None, None, None)]
RUNNING = [NodeTaskRow("ready", 7, "RUNNING", True, False)]


def _beat(**body: Any) -> Heartbeat:
    return Heartbeat.model_validate(body)


def _report(state: str, task_id: int = 7) -> dict[str, Any]:
    return {"task_id": task_id, "job_id": 1, "state": state}


@pytest.mark.parametrize(
    ("body", "node", "verdict"),
    [
        ({}, IDLE, Verdict.QUIET),
        ({"tasks": [_report("running")]}, RUNNING, Verdict.QUIET),
        ({}, [], Verdict.UNKNOWN_NODE),
        ({}, [NodeTaskRow("down", None, None, None, None)], Verdict.FULL),  # it is back
        ({"isolation": "none"}, IDLE, Verdict.FULL),  # a mode to store
        ({"tasks": [_report("exited")]}, RUNNING, Verdict.FULL),  # a task ended
        ({"tasks": [_report("running", task_id=8)]}, RUNNING, Verdict.FULL),  # a stale task
        ({}, [NodeTaskRow("ready", 7, "STARTING", False, False)], Verdict.FULL),  # to start
        ({}, [NodeTaskRow("ready", 7, "RUNNING", True, True)], Verdict.FULL),  # to stop
        ({"tasks": [_report("running")]}, [NodeTaskRow("ready", 7, "STARTING", True, False)],
         Verdict.FULL),  # STARTING → RUNNING
    ],
)  # fmt: skip
def test_classify(body: dict[str, Any], node: list[NodeTaskRow], verdict: Verdict) -> None:
    assert classify(_beat(**body), node, gpus_as_known=True) is verdict


def test_samples_of_gpus_not_as_known_take_the_full_path() -> None:
    beat = _beat(samples=[{"index": 0, "uuid": "GPU-0", "sampled_at": "2026-01-01T00:00:00Z"}])
    assert classify(beat, IDLE, gpus_as_known=True) is Verdict.QUIET
    assert classify(beat, IDLE, gpus_as_known=False) is Verdict.FULL
